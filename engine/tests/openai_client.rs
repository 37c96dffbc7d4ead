//! The official `openai` Python client (pip) talks to the running server, streaming and not,
//! with the API key the server requires (`--api-key`).
//! Needs `python3 -c 'import openai'` to work: .ci/run installs it.

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client_works() {
    let key = "sk-redline-test";
    let s = common::Server::start(&["--api-key", key]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(&s.base)
        .arg(key)
        .output()
        .await
        .expect("run python3");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "openai client checks failed:\n{so}\n{se}\n(install it with `python3 -m pip install openai`)");
    assert!(so.contains("all checks passed"));
}
