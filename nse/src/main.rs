use nse::{Config, run};
use nsm_sdk::tools::daemon::{exit_with, shutdown_signal};
use nsm_sdk::tools::grpc::Listeners;

#[tokio::main]
async fn main() {
    let cfg: Config = nsm_sdk::tools::daemon::parse_or_exit();
    cfg.common.init_or_exit("nse-icmp-responder");
    let sec = cfg.common.security_or_exit("nse-icmp-responder", cfg.max_token_lifetime).await;
    let listeners = Listeners::bind(&[cfg.listen_url()]).await.unwrap_or_else(|e| exit_with("nse-icmp-responder", e));
    if let Err(e) = run(cfg, sec, listeners, shutdown_signal()).await {
        exit_with("nse-icmp-responder", format!("{e:#}"));
    }
}
