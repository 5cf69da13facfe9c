use nsm_sdk::tools::daemon::{exit_with, parse_or_exit, shutdown_signal};
use nsm_sdk::tools::grpc::Listeners;
use nsm_sdk::tools::log;
use nsm_spiffe_dev::{Config, run};

const PROG: &str = "nsm-spiffe-dev";

#[tokio::main]
async fn main() {
    let cfg: Config = parse_or_exit();
    if let Err(e) = log::init(&cfg.log_level, cfg.log_format == "json") {
        eprintln!("{PROG}: {e}");
        std::process::exit(64);
    }
    let listeners = Listeners::bind(&cfg.listen_on.0).await.unwrap_or_else(|e| exit_with(PROG, e));
    if let Err(e) = run(cfg, listeners, shutdown_signal()).await {
        exit_with(PROG, format!("{e:#}"));
    }
}
