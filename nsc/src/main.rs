use nsc::{Client, Config, Mode, print};
use nsm_sdk::tools::daemon::shutdown_signal;

#[tokio::main]
async fn main() {
    let cfg: Config = nsm_sdk::tools::daemon::parse_or_exit();
    cfg.common.init_or_exit("nsc");
    let mode = cfg.mode;
    let sec = cfg.common.security_or_exit("nsc", cfg.max_token_lifetime).await;
    let mut client = Client::new(cfg.clone(), &sec);
    let summaries = match client.connect_all(mode == Mode::Run).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nsc: {e:#}");
            std::process::exit(1);
        }
    };
    print(&cfg, &summaries);
    if mode == Mode::Init {
        return;
    }
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut failed = 0;
    loop {
        // After a failed refresh retry soon; otherwise refresh at 20 % of
        // the path's shortest token lifetime.
        let wait = if failed > 0 { std::time::Duration::from_secs(1) } else { client.next_refresh() };
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(wait) => failed = client.refresh_all().await,
        }
    }
    client.close_all().await;
}
