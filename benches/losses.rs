//! criterion: forward + backward of every loss for P ∈ {8, 64, 512} × K ∈ {4, 8, 16}, CPU, f32.
//!
//! Run: `scripts/cargo bench --bench losses`

mod common;

use common::{losses, Inputs, PROMPTS, SLOTS};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::Duration;
use tch::Device;

fn forward_backward(c: &mut Criterion) {
    tch::set_num_threads(1);
    for (name, loss) in losses() {
        let mut group = c.benchmark_group(name);
        group
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        for prompts in PROMPTS {
            for slots in SLOTS {
                let inputs = Inputs::new(prompts, slots, Device::Cpu);
                let id = BenchmarkId::from_parameter(format!("P{prompts}xK{slots}"));
                group.bench_function(id, |b| b.iter(|| inputs.step(loss.as_ref(), true)));
            }
        }
        group.finish();
    }
}

criterion_group!(benches, forward_backward);
criterion_main!(benches);
