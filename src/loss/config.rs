//! [`LossConfig`]: every loss of the crate and its hyperparameters as one configuration, for
//! trainers and command lines (serde with feature `mistral`, clap flags with `trainer`).

use crate::error::{RefaError, Result};
use crate::loss::{
    Dpo, EosMode, EosRegularizer, InfoNca, InfoNcaVariant, Mpo, PreferenceLoss, RefaDynamic,
    RefaOneVsAll, SimPo, TargetLength,
};
use crate::partition::DeviationMode;

/// Which loss [`LossConfig::build`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "model", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "model", serde(rename_all = "kebab-case"))]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum LossKind {
    /// [`RefaDynamic`] (default).
    #[default]
    RefaDynamic,
    /// [`RefaOneVsAll`].
    RefaOneVsAll,
    /// [`InfoNca`], reference-free, `Full`.
    InfoNca,
    /// [`InfoNca`], reference-free, `PositivesOnly`.
    InfoNcaPositivesOnly,
    /// [`InfoNca`], reference-free, `OneVsAll`.
    InfoNcaOneVsAll,
    /// [`InfoNca::original`]: with a reference model.
    InfoNcaReference,
    /// [`SimPo`].
    Simpo,
    /// [`Dpo`] (with a reference model).
    Dpo,
    /// [`Mpo`] (with a reference model).
    Mpo,
}

/// Which quantity the EOS regularizer penalizes ([`EosMode`] without its parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "model", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "model", serde(rename_all = "kebab-case"))]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum EosKind {
    /// [`EosMode::FinalProbability`].
    FinalProbability,
    /// [`EosMode::TargetLength`], with `eos_target`.
    TargetLength,
    /// [`EosMode::FinalLogProbability`].
    FinalLogProbability,
    /// [`EosMode::Budgeted`], with `eos_budget`.
    Budgeted,
}

/// A loss and its hyperparameters. Every field left `None` takes the chosen loss's paper
/// default (see each loss's docs); a field set for a loss that has no such hyperparameter
/// (`gamma` for SimPO, `tau` for REFA, …) is refused by [`build`](Self::build), never
/// silently ignored.
///
/// The EOS regularizer is added when `eos_mode` is set or `eos_lambda` is > 0; its λ
/// defaults to the mode's ([`EosMode::default_lambda`]) and its mode to
/// `FinalProbability`; `eos_lambda = 0` turns it off.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "model", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "model", serde(default, deny_unknown_fields))]
#[cfg_attr(feature = "trainer", derive(clap::Args))]
// Flattened into a program's flags, this documentation must not become its `--help` text.
#[cfg_attr(feature = "trainer", command(about = None, long_about = None))]
pub struct LossConfig {
    /// The loss.
    #[cfg_attr(feature = "trainer", arg(long, value_enum, default_value_t = LossKind::RefaDynamic))]
    pub loss: LossKind,
    /// β, the inverse temperature (every loss).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub beta: Option<f64>,
    /// γ, the negatives' weight (REFA-dynamic, REFA-1-vs-all).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub gamma: Option<f64>,
    /// α, the deviation weighting (REFA, MPO).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub alpha: Option<f64>,
    /// p, the power of the deviation (REFA, MPO).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub power: Option<f64>,
    /// How the sign of `r − r̄` enters the deviation (REFA, MPO).
    #[cfg_attr(feature = "trainer", arg(long, value_enum))]
    pub deviation: Option<DeviationMode>,
    /// τ, the reward temperature (InfoNCA).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub tau: Option<f64>,
    /// γ_m, the target margin (SimPO).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub margin: Option<f64>,
    /// The SFT term's weight (SimPO).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub sft_weight: Option<f64>,
    /// Score by mean (`true`) or summed (`false`) token log-probability (every loss;
    /// default: the loss's own, mean for the reference-free ones, summed for DPO, MPO and
    /// InfoNCA with a reference).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub length_normalize: Option<bool>,
    /// λ of the EOS regularizer (0: off).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub eos_lambda: Option<f64>,
    /// What the EOS regularizer penalizes (turns it on).
    #[cfg_attr(feature = "trainer", arg(long, value_enum))]
    pub eos_mode: Option<EosKind>,
    /// `TargetLength`'s T: `prompt` (default), `batch` or a number of tokens.
    #[cfg_attr(feature = "trainer", arg(long))]
    pub eos_target: Option<String>,
    /// `Budgeted`'s b in tokens (default 256).
    #[cfg_attr(feature = "trainer", arg(long))]
    pub eos_budget: Option<usize>,
}

impl LossConfig {
    /// The configured loss, its hyperparameters checked ([`PreferenceLoss::validate`]).
    pub fn build(&self) -> Result<Box<dyn PreferenceLoss>> {
        self.refuse_foreign_fields()?;
        let loss = self.main_loss();
        let loss: Box<dyn PreferenceLoss> = match self.regularizer()? {
            Some(regularizer) => Box::new(loss.with_regularizer(regularizer)),
            None => loss,
        };
        loss.validate()?;
        Ok(loss)
    }

    /// Checks the configuration without keeping the loss.
    pub fn validate(&self) -> Result<()> {
        self.build().map(|_| ())
    }

    /// Which losses each optional field belongs to.
    fn refuse_foreign_fields(&self) -> Result<()> {
        use LossKind::*;
        let refa = [RefaDynamic, RefaOneVsAll];
        let weighted = [RefaDynamic, RefaOneVsAll, Mpo];
        let info_nca = [
            InfoNca,
            InfoNcaPositivesOnly,
            InfoNcaOneVsAll,
            InfoNcaReference,
        ];
        let text = |v: Option<f64>| v.map(|v| v.to_string());
        let checks: [(&'static str, Option<String>, &[LossKind]); 7] = [
            ("gamma", text(self.gamma), &refa),
            ("alpha", text(self.alpha), &weighted),
            ("power", text(self.power), &weighted),
            (
                "deviation",
                self.deviation.map(|d| format!("{d:?}")),
                &weighted,
            ),
            ("tau", text(self.tau), &info_nca),
            ("margin", text(self.margin), &[Simpo]),
            ("sft_weight", text(self.sft_weight), &[Simpo]),
        ];
        for (name, value, owners) in checks {
            if let Some(value) = value.filter(|_| !owners.contains(&self.loss)) {
                return Err(RefaError::option(
                    name,
                    value,
                    format!(
                        "left unset: {:?} has no `{name}` (only {owners:?} do)",
                        self.loss
                    ),
                ));
            }
        }
        let mode = self.eos_mode.unwrap_or(EosKind::FinalProbability);
        if self.eos_target.is_some() && mode != EosKind::TargetLength {
            return Err(RefaError::option(
                "eos_target",
                "set",
                "unset unless eos_mode is target-length",
            ));
        }
        if self.eos_budget.is_some() && mode != EosKind::Budgeted {
            return Err(RefaError::option(
                "eos_budget",
                "set",
                "unset unless eos_mode is budgeted",
            ));
        }
        Ok(())
    }

    fn main_loss(&self) -> Box<dyn PreferenceLoss> {
        let normalize = |default: bool| self.length_normalize.unwrap_or(default);
        let deviation = |default: DeviationMode| self.deviation.unwrap_or(default);
        match self.loss {
            LossKind::RefaDynamic => {
                let d = RefaDynamic::default();
                Box::new(RefaDynamic {
                    beta: self.beta.unwrap_or(d.beta),
                    gamma: self.gamma.unwrap_or(d.gamma),
                    alpha: self.alpha.unwrap_or(d.alpha),
                    power: self.power.unwrap_or(d.power),
                    deviation: deviation(d.deviation),
                    length_normalize: normalize(d.length_normalize),
                })
            }
            LossKind::RefaOneVsAll => {
                let d = RefaOneVsAll::default();
                Box::new(RefaOneVsAll {
                    beta: self.beta.unwrap_or(d.beta),
                    gamma: self.gamma.unwrap_or(d.gamma),
                    alpha: self.alpha.unwrap_or(d.alpha),
                    power: self.power.unwrap_or(d.power),
                    deviation: deviation(d.deviation),
                    length_normalize: normalize(d.length_normalize),
                })
            }
            LossKind::InfoNca
            | LossKind::InfoNcaPositivesOnly
            | LossKind::InfoNcaOneVsAll
            | LossKind::InfoNcaReference => {
                let (d, variant) = match self.loss {
                    LossKind::InfoNcaReference => (InfoNca::original(), InfoNcaVariant::Full),
                    LossKind::InfoNcaPositivesOnly => {
                        (InfoNca::default(), InfoNcaVariant::PositivesOnly)
                    }
                    LossKind::InfoNcaOneVsAll => (InfoNca::default(), InfoNcaVariant::OneVsAll),
                    _ => (InfoNca::default(), InfoNcaVariant::Full),
                };
                Box::new(InfoNca {
                    beta: self.beta.unwrap_or(d.beta),
                    tau: self.tau.unwrap_or(d.tau),
                    variant,
                    length_normalize: normalize(d.length_normalize),
                    ..d
                })
            }
            LossKind::Simpo => {
                let d = SimPo::default();
                Box::new(SimPo {
                    beta: self.beta.unwrap_or(d.beta),
                    margin: self.margin.unwrap_or(d.margin),
                    sft_weight: self.sft_weight.unwrap_or(d.sft_weight),
                    length_normalize: normalize(d.length_normalize),
                })
            }
            LossKind::Dpo => {
                let d = Dpo::default();
                Box::new(Dpo {
                    beta: self.beta.unwrap_or(d.beta),
                    length_normalize: normalize(d.length_normalize),
                })
            }
            LossKind::Mpo => {
                let d = Mpo::default();
                Box::new(Mpo {
                    beta: self.beta.unwrap_or(d.beta),
                    alpha: self.alpha.unwrap_or(d.alpha),
                    power: self.power.unwrap_or(d.power),
                    deviation: deviation(d.deviation),
                    length_normalize: normalize(d.length_normalize),
                })
            }
        }
    }

    /// The EOS regularizer, when configured.
    fn regularizer(&self) -> Result<Option<EosRegularizer>> {
        let enabled = match self.eos_lambda {
            Some(lambda) => lambda != 0.0,
            None => self.eos_mode.is_some(),
        };
        if !enabled {
            return Ok(None);
        }
        let mode = match self.eos_mode.unwrap_or(EosKind::FinalProbability) {
            EosKind::FinalProbability => EosMode::FinalProbability,
            EosKind::FinalLogProbability => EosMode::FinalLogProbability,
            EosKind::Budgeted => EosMode::Budgeted {
                budget: self.eos_budget.unwrap_or(256),
            },
            EosKind::TargetLength => EosMode::TargetLength(self.target_length()?),
        };
        let mut regularizer = EosRegularizer::new(mode);
        if let Some(lambda) = self.eos_lambda {
            regularizer.lambda = lambda;
        }
        Ok(Some(regularizer))
    }

    fn target_length(&self) -> Result<TargetLength> {
        match self.eos_target.as_deref() {
            None | Some("prompt") => Ok(TargetLength::PromptLongest),
            Some("batch") => Ok(TargetLength::BatchLongest),
            Some(n) => n.parse().map(TargetLength::Fixed).map_err(|_| {
                RefaError::option("eos_target", n, "`prompt`, `batch` or a number of tokens")
            }),
        }
    }
}
