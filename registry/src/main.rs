use nsm_registry::{Config, run};
use nsm_sdk::tools::daemon::{exit_with, shutdown_signal};
use nsm_sdk::tools::grpc::Listeners;

#[tokio::main]
async fn main() {
    let cfg: Config = nsm_sdk::tools::daemon::parse_or_exit();
    cfg.common.init_or_exit("nsm-registry");
    let sec = cfg.common.security_or_exit("nsm-registry", cfg.max_token_lifetime).await;
    let listeners = Listeners::bind(&cfg.listen_on.0).await.unwrap_or_else(|e| exit_with("nsm-registry", e));
    if let Err(e) = run(cfg, sec, listeners, shutdown_signal()).await {
        exit_with("nsm-registry", format!("{e:#}"));
    }
}
