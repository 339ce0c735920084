//! The log service (the seed's section 2.4) against real broker processes: drains posted
//! to the way Cloud Foundry's syslog agent does (one RFC 5424 message per POST, or
//! octet-counted batches), Debian's `logger` over TCP, `brokerage logs`, a second broker
//! sharing the MySQL store, a flood.

use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

fn brokerage_logs(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_brokerage"))
        .arg("logs")
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn an_apps_logs_arrive_by_drain_and_syslog_and_unbind_and_deprovision_end_them() {
    let syslog = free_port();
    let config = logs_config(Some(syslog));
    let file = config.write();
    let broker = BrokerProcess::start(&file, config.port, &config.dir.path().join("b.log")).await;
    let client = broker.client();

    let catalog = client.catalog().await;
    let service = catalog.body["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == LOG_SERVICE)
        .unwrap()
        .clone();
    assert_eq!(service["requires"], json!(["syslog_drain"]));

    let id = unique("logs");
    client
        .provision_with(&id, provision_body(LOG_SERVICE, LOG_PLAN), false)
        .await
        .expect(201);
    // A drain is for an app: a bind naming none is refused, and nothing is recorded.
    client
        .bind_with(&id, "no-app", bind_body(LOG_SERVICE, LOG_PLAN, None), false)
        .await
        .expect_error(422, Some("RequiresApp"));
    let app = "3e0b1150-6e4c-4b3c-a1ba-3f6cc7b3a7c5";
    let other_app = "7d1c2b3a-0000-4b3c-a1ba-3f6cc7b3a7c5";
    let first = client
        .bind_with(
            &id,
            "b-one",
            json!({"service_id": LOG_SERVICE, "plan_id": LOG_PLAN,
            "bind_resource": {"app_guid": app}}),
            false,
        )
        .await;
    first.expect(201);
    let drain = first.body["syslog_drain_url"].as_str().unwrap().to_string();
    assert!(
        drain.starts_with(&format!("{}/drains/b-one/", broker.base)),
        "{drain}"
    );
    assert_eq!(
        first.body["credentials"],
        json!({}),
        "the URL is no credential"
    );
    let second = client
        .bind_with(
            &id,
            "b-two",
            bind_body(LOG_SERVICE, LOG_PLAN, Some(other_app)),
            false,
        )
        .await;
    second.expect(201);
    let other_drain = second.body["syslog_drain_url"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(drain, other_drain, "each binding has its own drain");
    // Repeating the bind answers the same URL; fetching the binding too.
    let again = client
        .bind_with(
            &id,
            "b-one",
            json!({"service_id": LOG_SERVICE, "plan_id": LOG_PLAN,
            "bind_resource": {"app_guid": app}}),
            false,
        )
        .await;
    again.expect(200);
    assert_eq!(again.body["syslog_drain_url"], drain.as_str());
    let fetched = client
        .call(
            Method::GET,
            &format!("/v2/service_instances/{id}/service_bindings/b-one"),
            None,
        )
        .await;
    fetched.expect(200);
    assert_eq!(fetched.body["syslog_drain_url"], drain.as_str());

    // The syslog agent: one message per POST; a batch drain: octet-counted messages.
    let http = reqwest::Client::new();
    let post = |url: String, body: String| {
        let http = http.clone();
        async move {
            http.post(url)
                .header("Content-Type", "text/plain")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    // curl, as the agent posts: one message, text/plain.
    let curl = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-H", "Content-Type: text/plain", "--data-binary"])
        .arg(cf_message(app, "hello from web"))
        .arg(&drain)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");
    let (a, b) = (
        cf_message(app, "batched one"),
        "<14>1 2026-12-02T01:02:04Z org.space.myapp 3e0b1150-6e4c-4b3c-a1ba-3f6cc7b3a7c5 [RTR/1] - - GET / 200".to_string(),
    );
    let batch = format!("{} {a}{} {b}", a.len(), b.len());
    assert_eq!(post(drain.clone(), batch).await.status(), 200);
    assert_eq!(
        post(other_drain.clone(), cf_message(other_app, "the other app"))
            .await
            .status(),
        200
    );
    // A wrong token, an unknown binding: 404 and not a word more.
    let wrong = post(format!("{drain}x"), cf_message(app, "forged")).await;
    assert_eq!(wrong.status(), 404);
    assert_eq!(wrong.text().await.unwrap(), "");
    let (base, token) = drain.rsplit_once('/').unwrap();
    let unknown = post(
        format!("{}/nobody/{token}", base.rsplit_once('/').unwrap().0),
        "x".into(),
    )
    .await;
    assert_eq!(unknown.status(), 404);
    let hostile = post(
        format!("{}/drains/%E2%98%83/{token}", broker.base),
        "x".into(),
    )
    .await;
    assert_eq!(hostile.status(), 404);
    assert_eq!(hostile.text().await.unwrap(), "");

    // Debian's logger: RFC 5424 over TCP with octet counting, the app's GUID as APP-NAME.
    let sent = Command::new("logger")
        .args(["--server", "127.0.0.1", "--port", &syslog.to_string()])
        .args(["--tcp", "--octet-count", "--rfc5424", "--tag", app])
        .arg("sent by logger over tcp")
        .status()
        .unwrap();
    assert!(sent.success());

    let got = wait_for_lines(&client, &id, 5).await;
    let lines = got["lines"].as_array().unwrap();
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    for expected in [
        "hello from web",
        "batched one",
        "GET / 200",
        "the other app",
        "sent by logger over tcp",
    ] {
        assert!(texts.contains(&expected), "{expected:?} in {texts:?}");
    }
    assert!(!texts.contains(&"forged"));
    let web = lines
        .iter()
        .find(|l| l["text"] == "hello from web")
        .unwrap();
    assert_eq!(web["app"], app);
    assert_eq!(web["host"], "org.space.myapp");
    assert_eq!(web["process"], "APP/PROC/WEB/0");
    let router = lines.iter().find(|l| l["text"] == "GET / 200").unwrap();
    assert_eq!(router["process"], "RTR/1");

    // The operator's command prints them, from the running broker.
    let printed = brokerage_logs(&[
        &id,
        "--config",
        file.to_str().unwrap(),
        "--broker",
        &broker.base,
    ]);
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let out = String::from_utf8_lossy(&printed.stdout);
    assert!(
        out.lines().any(|l| l.contains("org.space.myapp")
            && l.contains("[APP/PROC/WEB/0]")
            && l.ends_with("hello from web")),
        "{out}"
    );
    assert_eq!(out.lines().count(), 5, "{out}");

    // --follow prints what arrives later.
    let mut follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_brokerage"))
        .args([
            "logs",
            &id,
            "--follow",
            "--config",
            file.to_str().unwrap(),
            "--broker",
            &broker.base,
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(follow.stdout.take().unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        post(drain.clone(), cf_message(app, "later line"))
            .await
            .status(),
        200
    );
    let followed = tokio::time::timeout(Duration::from_secs(15), async {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            if line.contains("later line") {
                return Some(line.clone());
            }
        }
    })
    .await
    .expect("--follow printed the new line");
    assert!(followed.is_some());
    follow.kill().await.unwrap();

    // Unbind revokes the drain at once; the other binding's drain still works.
    client
        .unbind_from(&id, "b-one", LOG_SERVICE, LOG_PLAN)
        .await
        .expect(200);
    assert_eq!(
        post(drain.clone(), cf_message(app, "after unbind"))
            .await
            .status(),
        404
    );
    assert_eq!(
        post(other_drain.clone(), cf_message(other_app, "still here"))
            .await
            .status(),
        200
    );
    // Nor does the syslog listener deliver for the unbound app any more.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sent = Command::new("logger")
        .args(["--server", "127.0.0.1", "--port", &syslog.to_string()])
        .args(["--tcp", "--octet-count", "--rfc5424", "--tag", app])
        .arg("logger after unbind")
        .status()
        .unwrap();
    assert!(sent.success());
    let got = wait_for_lines(&client, &id, 7).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let texts: Vec<String> = read_lines(&client, &id).await["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect();
    assert!(texts.contains(&"still here".to_string()), "{got}");
    assert!(
        !texts.iter().any(|t| t.contains("after unbind")),
        "{texts:?}"
    );

    // Deprovision deletes the instance's logs.
    client
        .unbind_from(&id, "b-two", LOG_SERVICE, LOG_PLAN)
        .await
        .expect(200);
    client
        .deprovision(&id, LOG_SERVICE, LOG_PLAN)
        .await
        .expect(200);
    assert_eq!(
        post(other_drain.clone(), cf_message(other_app, "gone"))
            .await
            .status(),
        404
    );
    let printed = brokerage_logs(&[
        &id,
        "--config",
        file.to_str().unwrap(),
        "--broker",
        &broker.base,
    ]);
    assert!(!printed.status.success());
    assert!(
        String::from_utf8_lossy(&printed.stderr).contains("keeps no logs"),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    // The broker logged every request at trace level, and never a drain's token.
    let logged = std::fs::read_to_string(&broker.log).unwrap();
    assert!(
        logged.contains("/drains/b-one/***"),
        "drain requests are logged"
    );
    for url in [&drain, &other_drain] {
        let token = url.rsplit('/').next().unwrap();
        assert!(!logged.contains(token), "a drain token reached the log");
    }
}

#[tokio::test]
async fn a_second_broker_sharing_the_mysql_store_shows_the_same_lines() {
    let store = StoreKind::fresh_mysql();
    let first_config = logs_config(None).with_store(store.clone());
    let second_config = logs_config(None).with_store(store);
    let (f1, f2) = (first_config.write(), second_config.write());
    let first = BrokerProcess::start(
        &f1,
        first_config.port,
        &first_config.dir.path().join("1.log"),
    )
    .await;
    let second = BrokerProcess::start(
        &f2,
        second_config.port,
        &second_config.dir.path().join("2.log"),
    )
    .await;
    let id = unique("shared-logs");
    // Provisioned and bound through the first broker; the drain is its URL, but the load
    // balancer may send each POST to either: both accept it.
    let drains = log_instance(&first.client(), &id, &["app-shared"]).await;
    let path = drains[0].strip_prefix(&first.base).unwrap().to_string();
    let http = reqwest::Client::new();
    for (i, base) in [&first.base, &second.base].into_iter().enumerate() {
        let answer = http
            .post(format!("{base}{path}"))
            .body(cf_message("app-shared", &format!("line via broker {i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let seen_by_second = wait_for_lines(&second.client(), &id, 2).await;
    let seen_by_first = wait_for_lines(&first.client(), &id, 2).await;
    assert_eq!(seen_by_first["lines"], seen_by_second["lines"]);
    // `brokerage logs` with the shared store's configuration reads it directly.
    let printed = brokerage_logs(&[&id, "--config", f2.to_str().unwrap()]);
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let out = String::from_utf8_lossy(&printed.stdout);
    assert!(
        out.contains("line via broker 0") && out.contains("line via broker 1"),
        "{out}"
    );
}

#[tokio::test]
async fn a_flood_costs_the_flooding_app_its_oldest_lines_and_never_the_osb_calls() {
    let config = logs_config(None);
    let file = config.write();
    let broker = BrokerProcess::start(&file, config.port, &config.dir.path().join("b.log")).await;
    let client = broker.client();
    let id = unique("flood");
    let drains = log_instance(&client, &id, &["quiet-app", "loud-app"]).await;
    let http = reqwest::Client::new();
    for i in 0..5 {
        let answer = http
            .post(&drains[0])
            .body(cf_message("quiet-app", &format!("quiet {i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    wait_for_lines(&client, &id, 5).await;
    // 4,000 lines from one app, 8 posters at once, in batches of 20 as https-batch sends.
    let flood = flood(&drains[1..], "loud-app", 8, 25);
    // Meanwhile OSB calls are answered as usual.
    for i in 0..20 {
        client.catalog().await.expect(200);
        let other = format!("{id}-osb-{i}");
        client
            .provision_with(&other, provision_body(LOG_SERVICE, LOG_PLAN), false)
            .await
            .expect(201);
    }
    for poster in flood {
        poster.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let got = read_lines(&client, &id).await;
    let lines = got["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 50, "the plan keeps 50 lines");
    let quiet = lines.iter().filter(|l| l["app"] == "quiet-app").count();
    assert_eq!(quiet, 5, "the quiet app keeps its lines: {got}");
    assert_eq!(got["dropped"]["loud-app"], 4000 - 45, "{}", got["dropped"]);
    assert!(got["dropped"].get("quiet-app").is_none());
}

/// The hostile or broken sender: a body over the cap, a body that never finishes, an
/// octet count past the message limit, garbage, more connections than allowed. Each is
/// cut off; nothing it sent is kept, and honest senders still get through.
#[tokio::test]
async fn the_drains_and_the_syslog_listener_hold_their_limits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let syslog = free_port();
    let mut config = logs_config(Some(syslog)).with_listen("body_timeout_secs: 2");
    config.backends[0] = format!(
        "logs: {{flush_interval_ms: 100, syslog_listen: \"127.0.0.1:{syslog}\", syslog_max_connections: 2}}"
    );
    let file = config.write();
    let broker = BrokerProcess::start(&file, config.port, &config.dir.path().join("b.log")).await;
    let client = broker.client();
    let id = unique("limits");
    let app = "limit-app";
    let drains = log_instance(&client, &id, &[app]).await;
    let http = reqwest::Client::new();

    // An app GUID that cannot be a store key binds and unbinds (its drain URL works; only
    // the syslog listener, which routes by app, does not know it).
    let odd = client
        .bind_with(
            &id,
            "odd-app",
            bind_body(LOG_SERVICE, LOG_PLAN, Some("☃ app/../x")),
            false,
        )
        .await;
    odd.expect(201);
    client
        .unbind_from(&id, "odd-app", LOG_SERVICE, LOG_PLAN)
        .await
        .expect(200);

    // Over broker.max_body_bytes (64 KiB in the tests): 413.
    let huge = format!("{} {}", 100_000, "x".repeat(100_000));
    let answer = http.post(&drains[0]).body(huge).send().await.unwrap();
    assert_eq!(answer.status(), 413);
    // A body that never finishes: 408 after listen.body_timeout_secs.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", config.port))
        .await
        .unwrap();
    let path = drains[0].strip_prefix(&broker.base).unwrap();
    slow.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n<14>1 - - ")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut head))
        .await
        .expect("the broker answers a stalled body")
        .unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 408"));

    // Syslog: two connections at most; a third is closed at once.
    let mut first = tokio::net::TcpStream::connect(("127.0.0.1", syslog))
        .await
        .unwrap();
    let mut second = tokio::net::TcpStream::connect(("127.0.0.1", syslog))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::net::TcpStream::connect(("127.0.0.1", syslog))
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), third.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a third connection is closed"
    );
    // Garbage is skipped and the connection goes on; a good message after it arrives.
    let good = cf_message(app, "after garbage");
    first
        .write_all(format!("this is not syslog\n{} {good}", good.len()).as_bytes())
        .await
        .unwrap();
    // An octet count past 64 KiB closes that connection before anything is read.
    second.write_all(b"9999999 <14>1 ").await.unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(5), second.read(&mut byte)).await;
    assert!(
        matches!(cut, Ok(Ok(0)) | Ok(Err(_))),
        "an oversized message closes the connection"
    );
    let got = wait_for_lines(&client, &id, 1).await;
    let texts: Vec<&str> = got["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["after garbage"], "only the honest message is kept");
    // With one connection freed, a new one is served again.
    drop(second);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = tokio::net::TcpStream::connect(("127.0.0.1", syslog))
        .await
        .unwrap();
    let m = cf_message(app, "on a new connection");
    again
        .write_all(format!("{} {m}", m.len()).as_bytes())
        .await
        .unwrap();
    wait_for_lines(&client, &id, 2).await;
}
