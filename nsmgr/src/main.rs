use nsm_sdk::tools::daemon::{exit_with, shutdown_signal};
use nsm_sdk::tools::grpc::Listeners;
use nsmgr::{Config, run};

#[tokio::main]
async fn main() {
    let cfg: Config = nsm_sdk::tools::daemon::parse_or_exit();
    cfg.common.init_or_exit("nsmgr");
    let sec = cfg.common.security_or_exit("nsmgr", cfg.max_token_lifetime).await;
    let listeners = Listeners::bind(&cfg.listen_on.0).await.unwrap_or_else(|e| exit_with("nsmgr", e));
    if let Err(e) = run(cfg, sec, listeners, shutdown_signal()).await {
        exit_with("nsmgr", format!("{e:#}"));
    }
}
