use nsm_k8s::webhook::{Config, run};
use nsm_sdk::tools::daemon::{exit_with, parse_or_exit, shutdown_signal};

const PROG: &str = "nsm-admission-webhook";

#[tokio::main]
async fn main() {
    let cfg: Config = parse_or_exit();
    if let Err(e) = nsm_sdk::tools::log::init(&cfg.log_level, cfg.log_format == "json") {
        eprintln!("{PROG}: {e}");
        std::process::exit(64);
    }
    let checked = match cfg.check() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{PROG}: {e:#}");
            std::process::exit(64);
        }
    };
    if let Err(e) = run(checked, shutdown_signal()).await {
        exit_with(PROG, format!("{e:#}"));
    }
}
