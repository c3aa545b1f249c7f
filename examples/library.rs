//! A keyed image through the library: the built-in tiny model on green, its matte and cut-out.
//! `cargo run --example library` writes library-car.png, .matte.png and .cutout.png.
use std::sync::atomic::AtomicBool;
use tkg::run::{JobFile, NoEvents, Plan, RunConfig, Runner};
use tkg::settings::Settings;

fn main() -> anyhow::Result<()> {
    let settings = Settings {
        model: "tiny-sd15".into(),
        prompt: "a red vintage car, studio photo".into(),
        seed: Some(42),
        steps: Some(20),
        out: "library-car.png".into(),
        ..Settings::default()
    };
    let config = RunConfig {
        device: "cpu".into(),
        overwrite: true,
        ..RunConfig::default()
    };
    let plan = Plan::new(&JobFile::command_line(), &settings, 42, "", &config)?;
    let cancel = AtomicBool::new(false);
    let runner = Runner {
        config: &config,
        events: &NoEvents,
        cancel: &cancel,
    };
    let summary = runner.run(&plan)?;
    println!(
        "{} image(s): library-car.png and its matte and cut-out",
        summary.written
    );
    Ok(())
}
