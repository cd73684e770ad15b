//! Checks of shapes, kinds, devices, values and hyperparameters, each returning the
//! [`RefaError`] that names the culprit.

use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};

/// Checks that `tensor` is `[P, K]` and returns that shape.
pub(crate) fn prompt_slot_shape(name: &'static str, tensor: &Tensor) -> Result<Vec<i64>> {
    let shape = tensor.size();
    if shape.len() != 2 {
        return Err(RefaError::ShapeMismatch {
            tensor: name,
            actual: shape,
            expected: "[P, K] (prompts × response slots)".to_string(),
        });
    }
    Ok(shape)
}

pub(crate) fn same_shape(
    name: &'static str,
    tensor: &Tensor,
    reference: &'static str,
    expected: &[i64],
) -> Result<()> {
    let actual = tensor.size();
    if actual != expected {
        return Err(RefaError::ShapeMismatch {
            tensor: name,
            actual,
            expected: format!("{expected:?} like `{reference}`"),
        });
    }
    Ok(())
}

pub(crate) fn same_device(
    name: &'static str,
    tensor: &Tensor,
    reference: &'static str,
    expected: Device,
) -> Result<()> {
    let actual = tensor.device();
    if actual != expected {
        return Err(RefaError::DeviceMismatch {
            tensor: name,
            actual,
            reference,
            expected,
        });
    }
    Ok(())
}

/// f64 inputs compute in f64; every other float kind computes in f32, which keeps bf16 and
/// f16 log-probability sums (often in the thousands) from losing their small differences.
/// The losses and the scorers share this rule.
pub(crate) fn compute_kind(input: Kind) -> Kind {
    if input == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

pub(crate) fn float_kind(name: &'static str, tensor: &Tensor) -> Result<()> {
    let actual = tensor.kind();
    if !is_float(actual) {
        return Err(RefaError::WrongKind {
            tensor: name,
            actual,
            expected: "a floating-point kind (f32, f64, bf16 or f16)",
        });
    }
    Ok(())
}

pub(crate) fn numeric_kind(name: &'static str, tensor: &Tensor) -> Result<()> {
    let actual = tensor.kind();
    let integer = matches!(
        actual,
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
    );
    if !(integer || is_float(actual)) {
        return Err(RefaError::WrongKind {
            tensor: name,
            actual,
            expected: "a real numeric kind (integer or floating point)",
        });
    }
    Ok(())
}

pub(crate) fn exact_kind(name: &'static str, tensor: &Tensor, expected: Kind) -> Result<()> {
    let actual = tensor.kind();
    if actual != expected {
        let expected = match expected {
            Kind::Bool => "Bool (true marks a valid entry)",
            Kind::Int64 => "Int64",
            _ => "another kind",
        };
        return Err(RefaError::WrongKind {
            tensor: name,
            actual,
            expected,
        });
    }
    Ok(())
}

/// One check of the values of a tensor at the positions a mask selects.
pub(crate) struct ValueCheck<'a> {
    name: &'static str,
    values: &'a Tensor,
    bad: Tensor,
    requirement: &'static str,
}

impl<'a> ValueCheck<'a> {
    /// Values must be finite where `valid` is true.
    pub fn finite(name: &'static str, values: &'a Tensor, valid: &Tensor) -> Self {
        let bad = values.isfinite().logical_not().logical_and(valid);
        ValueCheck {
            name,
            values,
            bad,
            requirement: "finite",
        }
    }

    /// Values must be finite and > 0 where `valid` is true.
    pub fn positive_finite(name: &'static str, values: &'a Tensor, valid: &Tensor) -> Self {
        let ok = values.isfinite().logical_and(&values.gt(0.0));
        let bad = ok.logical_not().logical_and(valid);
        ValueCheck {
            name,
            values,
            bad,
            requirement: "finite and > 0",
        }
    }
}

impl<'a> ValueCheck<'a> {
    /// A structural rule already evaluated: `bad` flags its violations, reported as the
    /// value 1 (true) at the first flagged position.
    pub fn flagged(name: &'static str, bad: &'a Tensor, requirement: &'static str) -> Self {
        ValueCheck {
            name,
            values: bad,
            bad: bad.shallow_clone(),
            requirement,
        }
    }
}

/// Runs every check with a single device-to-host copy of one flag each; only when a check
/// fails is the first offending position looked up.
pub(crate) fn run_value_checks(checks: &[ValueCheck<'_>]) -> Result<()> {
    if checks.is_empty() {
        return Ok(());
    }
    let flags: Vec<Tensor> = checks.iter().map(|check| check.bad.any()).collect();
    let flags = Tensor::stack(&flags, 0)
        .to_kind(Kind::Int64)
        .to_device(Device::Cpu);
    let flags = Vec::<i64>::try_from(&flags)?;
    match checks.iter().zip(flags).find(|(_, flag)| *flag != 0) {
        None => Ok(()),
        Some((check, _)) => Err(first_violation(check)?),
    }
}

fn first_violation(check: &ValueCheck<'_>) -> Result<RefaError> {
    let index = Vec::<i64>::try_from(&check.bad.nonzero().get(0).to_device(Device::Cpu))?;
    let value = check
        .values
        .detach()
        .to_kind(Kind::Double)
        .to_device(Device::Cpu)
        .double_value(&index);
    let labels = ["prompt", "slot", "step"];
    let position = index
        .iter()
        .zip(labels)
        .map(|(i, label)| format!("{label} {i}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(RefaError::InvalidValue {
        tensor: check.name,
        position,
        value,
        requirement: check.requirement,
    })
}

/// Hyperparameter checks for one loss configuration.
pub(crate) struct Hyperparameters {
    loss: &'static str,
}

impl Hyperparameters {
    pub fn of(loss: &'static str) -> Self {
        Hyperparameters { loss }
    }

    fn check(
        &self,
        name: &'static str,
        value: f64,
        ok: bool,
        requirement: &'static str,
    ) -> Result<&Self> {
        if ok {
            Ok(self)
        } else {
            Err(RefaError::InvalidHyperparameter {
                loss: self.loss,
                name,
                value,
                requirement,
            })
        }
    }

    /// `value` must be finite and > 0.
    pub fn positive(&self, name: &'static str, value: f64) -> Result<&Self> {
        self.check(
            name,
            value,
            value.is_finite() && value > 0.0,
            "finite and > 0",
        )
    }

    /// `value` must be finite and >= 0.
    pub fn non_negative(&self, name: &'static str, value: f64) -> Result<&Self> {
        self.check(
            name,
            value,
            value.is_finite() && value >= 0.0,
            "finite and >= 0",
        )
    }

    /// `value` must be finite.
    pub fn finite(&self, name: &'static str, value: f64) -> Result<&Self> {
        self.check(name, value, value.is_finite(), "finite")
    }
}
