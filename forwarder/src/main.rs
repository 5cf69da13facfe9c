#[tokio::main]
async fn main() {
    nsm_sdk::tools::daemon::serve_main::<nsm_forwarder::Config, _, _>(nsm_forwarder::run).await
}
