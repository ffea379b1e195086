//! Hot reload of the config file (README, "Hot reload"): every way the file can change is
//! seen, and an invalid file changes nothing.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// How long a valid change may take to show up in routing.
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);
/// How long an invalid change is watched for (must not change routing).
const HOLD: Duration = Duration::from_millis(1500);

struct Arms {
    stable: FakeUpstream,
    canary: FakeUpstream,
}

impl Arms {
    async fn start() -> Arms {
        Arms {
            stable: FakeUpstream::start("stable").await,
            canary: FakeUpstream::start("canary").await,
        }
    }

    fn config(&self, canary_weight: u32) -> ConfigBuilder {
        ConfigBuilder::new()
            .upstream(
                "stable",
                &self.stable.url(),
                &(100 - canary_weight).to_string(),
            )
            .upstream("canary", &self.canary.url(), &canary_weight.to_string())
    }
}

/// Users whose arm is known at canary weights 10 and 50.
struct Users {
    /// bucket in [1000, 5000): stable at 10%, canary at 50%.
    mover: String,
    /// bucket in [5000, 10000): stable at both.
    stayer: String,
    /// bucket in [0, 1000): canary at both.
    loyal: String,
}

fn users() -> Users {
    Users {
        mover: user_in_bucket_range(1000..5000),
        stayer: user_in_bucket_range(5000..10000),
        loyal: user_in_bucket_range(0..1000),
    }
}

async fn arm_of(client: &HttpClient, addr: SocketAddr, user: &str) -> String {
    let reply = client.get(addr, "/", &[("x-user-id", user)]).await;
    assert_eq!(reply.status, http::StatusCode::OK, "{reply:?}");
    reply.arm().expect("arm header").to_string()
}

async fn wait_for_arm(client: &HttpClient, addr: SocketAddr, user: &str, arm: &str, what: &str) {
    poll_until(RELOAD_DEADLINE, what, || async {
        (arm_of(client, addr, user).await == arm).then_some(())
    })
    .await;
}

/// Assert routing of all three users matches canary weight `canary_weight` (10 or 50).
async fn assert_table(client: &HttpClient, addr: SocketAddr, u: &Users, canary_weight: u32) {
    let mover = if canary_weight >= 50 {
        "canary"
    } else {
        "stable"
    };
    assert_eq!(arm_of(client, addr, &u.mover).await, mover, "mover");
    assert_eq!(arm_of(client, addr, &u.stayer).await, "stable", "stayer");
    assert_eq!(arm_of(client, addr, &u.loyal).await, "canary", "loyal");
}

/// 10% -> 50% -> 10%: the second change proves the watcher survived the first (a rename or
/// `..data` swap replaces the inode a naive watch was on).
async fn reload_twice(layout: ConfigLayout, how: Rewrite) {
    let arms = Arms::start().await;
    let mut proxy = Proxy::start_with(&arms.config(10).build(), layout).await;
    let client = HttpClient::http1();
    let addr = proxy.addr();
    let u = users();
    assert_table(&client, addr, &u, 10).await;

    proxy.rewrite_config(&arms.config(50).build(), how);
    wait_for_arm(
        &client,
        addr,
        &u.mover,
        "canary",
        "first change (10% -> 50%)",
    )
    .await;
    assert_table(&client, addr, &u, 50).await;

    proxy.rewrite_config(&arms.config(10).build(), how);
    wait_for_arm(
        &client,
        addr,
        &u.mover,
        "stable",
        "second change (50% -> 10%)",
    )
    .await;
    assert_table(&client, addr, &u, 10).await;

    proxy
        .shutdown()
        .await
        .expect("run returns Ok after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_after_editor_style_rename() {
    reload_twice(ConfigLayout::Plain, Rewrite::Rename).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_after_copy_over_in_place() {
    reload_twice(ConfigLayout::Plain, Rewrite::InPlace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_after_kubernetes_configmap_symlink_swap() {
    reload_twice(ConfigLayout::ConfigMap, Rewrite::ConfigMapSwap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_keeps_the_last_good_routing() {
    let arms = Arms::start().await;
    let mut proxy = Proxy::start(&arms.config(10).build()).await;
    let client = HttpClient::http1();
    let addr = proxy.addr();
    let u = users();
    assert_table(&client, addr, &u, 10).await;

    // Each bad file also carries the new weights: a reload that ignored the problem would
    // move the mover to the canary.
    let typo = arms
        .config(50)
        .set("routing", "stiky_header", &q("x-user-id"))
        .build();
    let bad_sum = arms
        .config(50)
        .upstream("extra", "http://127.0.0.1:9", "5")
        .build();
    for (what, bad) in [("typo key", &typo), ("weights sum to 105", &bad_sum)] {
        assert!(
            canaryd::config::Config::parse(bad).is_err(),
            "test premise: the {what} config must be invalid"
        );
        proxy.rewrite_config(bad, Rewrite::Rename);
        let checks = hold_for(HOLD, || async {
            let mover = arm_of(&client, addr, &u.mover).await;
            let loyal = arm_of(&client, addr, &u.loyal).await;
            if mover == "stable" && loyal == "canary" {
                Ok(())
            } else {
                Err(format!(
                    "after writing an invalid config ({what}): mover -> {mover}, loyal -> {loyal}"
                ))
            }
        })
        .await;
        assert!(checks >= 5, "only {checks} checks while holding");
    }

    proxy.rewrite_config(&arms.config(50).build(), Rewrite::Rename);
    wait_for_arm(
        &client,
        addr,
        &u.mover,
        "canary",
        "valid config after invalid ones",
    )
    .await;
    assert_table(&client, addr, &u, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_canary_weight_only_moves_users_into_the_canary() {
    const N: usize = 400;
    let arms = Arms::start().await;
    let mut proxy = Proxy::start(&arms.config(10).build()).await;
    let client = HttpClient::http1();
    let addr = proxy.addr();
    let ids = user_ids(N);
    let arms_of = |replies: Vec<Reply>| -> Vec<String> {
        replies
            .iter()
            .map(|r| r.arm().expect("arm header").to_string())
            .collect()
    };
    let before = arms_of(route_all(&client, addr, &ids, 4).await);

    proxy.rewrite_config(&arms.config(30).build(), Rewrite::Rename);
    let mover = user_in_bucket_range(1000..3000);
    wait_for_arm(&client, addr, &mover, "canary", "change to 30%").await;
    let after = arms_of(route_all(&client, addr, &ids, 4).await);

    let mut moved_in = 0;
    for (i, id) in ids.iter().enumerate() {
        let expected = |p| {
            if reference_arm(id, p) {
                "canary"
            } else {
                "stable"
            }
        };
        assert_eq!(before[i], expected(10), "{id} at 10%");
        assert_eq!(after[i], expected(30), "{id} at 30%");
        assert!(
            !(before[i] == "canary" && after[i] == "stable"),
            "{id} moved out of the canary when its weight rose"
        );
        if before[i] == "stable" && after[i] == "canary" {
            moved_in += 1;
        }
    }
    assert!(
        moved_in > 40,
        "only {moved_in} of {N} users moved into the canary"
    );
}
