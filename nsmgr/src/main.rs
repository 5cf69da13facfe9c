#[tokio::main]
async fn main() {
    nsm_sdk::tools::daemon::serve_main::<nsmgr::Config, _, _>(nsmgr::run).await
}
