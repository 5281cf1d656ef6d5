//! Benches on a full-size SD 1.5 model (random weights from
//! tools/make_fullsize_model.py, or a real one): `$SDSERVE_BENCH_MODEL`, else
//! `models/sd15-random`. Without it the target prints one line and exits.
//! 256 px stages always; 512 px stages and whole `generate` calls only with
//! `SDSERVE_BENCH_FULL=1` (each 512-px stage takes seconds to tens of seconds,
//! times 11 runs). See benches/README.md.

mod common;

use criterion::{Criterion, criterion_group, criterion_main};

use common::stages::{self, Plan};

fn fullsize(c: &mut Criterion) {
    let dir = common::fullsize_model_dir();
    if !dir.join("model_index.json").is_file() {
        println!(
            "skipping full-size benches: no model at {}; make one with tools/make_fullsize_model.py",
            dir.display()
        );
        return;
    }
    let full = common::full_enabled();
    eprintln!(
        "full-size benches on {} (candle threads = {}; 512 px and generate: {})",
        dir.display(),
        common::threads(),
        if full {
            "on"
        } else {
            "off, set SDSERVE_BENCH_FULL=1"
        }
    );
    let t = std::time::Instant::now();
    let model = common::load(&dir);
    eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    stages::run(
        c,
        &model,
        &Plan {
            label: "sd15",
            sizes: &[256],
            slow: true,
            generate_steps: if full { 4 } else { 0 },
            text: true,
        },
    );
    if full {
        stages::run(
            c,
            &model,
            &Plan {
                label: "sd15",
                sizes: &[512],
                slow: true,
                generate_steps: 4,
                text: false,
            },
        );
    }
}

criterion_group!(benches, fullsize);
criterion_main!(benches);
