//! Reports rendered from a real run directory kept in tests/fixtures/report_run/ (made by
//! tests/fixtures/report_run.yaml on SmolLM2): every section present, the HTML well-formed XML
//! with no way to reach the network, the numbers equal to the stages' own files, a damaged or
//! missing stage said so while the rest renders, and headless Chromium drawing it at phone width.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{repo, text};

/// Each section's id in the HTML and heading in the Markdown.
const SECTIONS: [(&str, &str); 6] = [
    ("summary", "## Summary"),
    ("training", "## Training"),
    ("experts", "## Experts"),
    ("adaptation", "## Adaptation"),
    ("samples", "## Sample completions"),
    ("provenance", "## Provenance"),
];

/// A copy of the fixture run directory (tests never write into tests/).
fn fixture_copy(into: &Path) -> PathBuf {
    let run = into.join("report_run");
    let status = Command::new("cp")
        .args(["-r"])
        .arg(repo().join("tests/fixtures/report_run"))
        .arg(&run)
        .status()
        .unwrap();
    assert!(status.success());
    run
}

fn report(run: &Path, out: &Path) -> std::process::Output {
    report_with(run, out, &[])
}

/// `tsq report RUN --out OUT` with `extra` arguments.
fn report_with(run: &Path, out: &Path, extra: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tsq"))
        .arg("report")
        .arg(run)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Headless Chromium on `page` with this test's profile and `args`.
fn chromium(bin: &str, profile: &Path, page: &str, args: &[String]) -> std::process::Output {
    Command::new(bin)
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(page)
        .output()
        .unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Parses `html` as XML (the report is written as well-formed XHTML-compatible HTML) and
/// returns every element's name and attributes.
fn elements(html: &str) -> Vec<(String, Vec<(String, String)>)> {
    use quick_xml::events::{BytesStart, Event};
    let describe = |e: &BytesStart| {
        let attrs = e
            .attributes()
            .map(|a| {
                let a = a.unwrap();
                let value = a.unescape_value().unwrap().to_string();
                (String::from_utf8_lossy(a.key.as_ref()).to_string(), value)
            })
            .collect();
        (
            String::from_utf8_lossy(e.name().as_ref()).to_string(),
            attrs,
        )
    };
    let mut reader = quick_xml::Reader::from_str(html);
    let (mut out, mut open) = (Vec::new(), 0usize);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                out.push(describe(&e));
                open += 1;
            }
            Ok(Event::Empty(e)) => out.push(describe(&e)),
            Ok(Event::End(_)) => open -= 1,
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("not well-formed at {}: {e}", reader.buffer_position()),
        }
    }
    assert_eq!(open, 0, "elements left open");
    out
}

#[test]
fn the_fixture_run_reports_every_section_with_its_own_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let run = fixture_copy(dir.path());
    // The fixture's rewards run no code; a stage whose reward does records its sandbox's
    // containment in its manifest's summary (outside the hashed outputs), as this one now says.
    let coding = run.join("eval.coding/manifest.json");
    let mut manifest = json(&coding);
    manifest["summary"]["sandbox"] = "namespaces (root)".into();
    std::fs::write(&coding, manifest.to_string()).unwrap();
    let out = dir.path().join("out");
    let done = report(&run, &out);
    assert!(done.status.success(), "{}", text(&done));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("generated code in `eval.coding` ran with isolation: namespaces (root)"));
    assert_eq!(md.matches("ran with isolation").count(), 1);
    assert!(html.contains("<code>eval.coding</code> ran with isolation: namespaces (root)"));

    // Well-formed, every section, nothing that could load from elsewhere.
    let elements = elements(&html);
    for (id, heading) in SECTIONS {
        assert!(
            elements
                .iter()
                .any(|(n, a)| n == "section" && a.contains(&("id".into(), id.into()))),
            "no section `{id}`"
        );
        assert!(md.contains(heading), "no `{heading}`");
    }
    for (name, attrs) in &elements {
        for (key, value) in attrs {
            assert!(
                !(key == "src" || key == "href" || value.contains("url(")),
                "<{name} {key}=\"{value}\"> could make a request"
            );
        }
        assert!(
            !["script", "img", "link", "iframe"].contains(&name.as_str()),
            "<{name}>"
        );
    }
    assert!(
        html.contains("default-src 'none'"),
        "the CSP forbids requests"
    );
    assert!(
        elements.iter().filter(|(n, _)| n == "svg").count() >= 4,
        "charts inline"
    );
    assert!(
        !html.contains("Missing or damaged"),
        "the fixture run is complete"
    );

    // Every accuracy and interval of every evaluation, as the results files have them.
    for eval in ["eval.logic", "eval.coding"] {
        let results = json(&run.join(eval).join("results.json"));
        for (with, r) in results["results"].as_object().unwrap() {
            let pct = |v: &Value| format!("{:.1}", 100.0 * v.as_f64().unwrap());
            let acc = &r["acc"];
            let cells = format!(
                "| {} | {} | [{}, {}] |",
                kind(with, r),
                pct(&acc["value"]),
                pct(&acc["ci95"][0]),
                pct(&acc["ci95"][1])
            );
            let (plain, best) = (
                format!("| {with} {cells}"),
                format!("| ★ **{with}** {cells}"),
            );
            assert!(
                md.contains(&plain) || md.contains(&best),
                "{eval}: no `{plain}` in\n{md}"
            );
        }
    }
    // The overview: one row per setting, one column per evaluation, in the pipeline's order.
    let logic = json(&run.join("eval.logic/results.json"));
    let coding = json(&run.join("eval.coding/results.json"));
    let cell = |r: &Value, with: &str| {
        format!(
            "{:.1}",
            100.0 * r["results"][with]["acc"]["value"].as_f64().unwrap()
        )
    };
    let row = md
        .lines()
        .find(|l| l.starts_with("| base | "))
        .expect("an overview row for base");
    let (at_logic, at_coding) = (
        row.find(&cell(&logic, "base")),
        row.find(&cell(&coding, "base")),
    );
    assert!(
        at_logic.is_some() && at_coding.is_some() && at_logic < at_coding,
        "{row}"
    );

    // The router's check and the mixture's α.
    let router = json(&run.join("adapt.router/router.json"));
    let routed = format!(
        "{:.1}%",
        100.0 * router["check"]["accuracy"]["value"].as_f64().unwrap()
    );
    assert!(
        md.contains(&format!("Routed to the right expert: {routed}")),
        "{md}"
    );
    let alpha = json(&run.join("adapt.mix/alpha.json"));
    for (k, expert) in alpha["experts"].as_array().unwrap().iter().enumerate() {
        let a = alpha["alpha"][k][0].as_f64().unwrap();
        let shown = format!("{} {}", expert.as_str().unwrap(), round2(a));
        assert!(md.contains(&shown), "no `{shown}`");
    }
    // A multiple-choice sample lists its options, the answer and the gold one marked.
    let options = md
        .split("| option | text | log-lik | |")
        .nth(1)
        .expect("a sample's options table");
    let rows: Vec<&str> = options
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with("| "))
        .collect();
    assert!(rows.len() >= 2, "{options}");
    assert!(rows.iter().any(|r| r.contains("answer")) && rows.iter().any(|r| r.contains("gold")));
    assert!(html.contains("<table class=\"options\">"));
    // Provenance: the model's checksum and the pipeline as run.
    let model = json(&run.join("model/manifest.json"));
    assert!(md.contains(model["summary"]["blake3"].as_str().unwrap()));
    assert!(md.contains("\"name\": \"report_run\""));
    // The Markdown's charts are files beside it.
    for chart in md.split("](charts/").skip(1) {
        let file = &chart[..chart.find(')').unwrap()];
        assert!(out.join("charts").join(file).is_file(), "{file}");
    }
}

/// A setting's kind as the summary table names it.
fn kind(with: &str, r: &Value) -> String {
    match (r.get("adaptation"), with) {
        (Some(a), _) => a["strategy"].as_str().unwrap().to_string(),
        (None, "base") => "base".into(),
        _ => "expert".into(),
    }
}

/// minijinja's `round(2)` of a float, as the template prints it.
fn round2(x: f64) -> String {
    let r = (x * 100.0).round() / 100.0;
    if r.fract() == 0.0 {
        format!("{r:.1}")
    } else {
        format!("{r}")
    }
}

#[test]
fn a_damaged_or_missing_stage_is_said_and_the_rest_renders() {
    let dir = tempfile::tempdir().unwrap();
    let run = fixture_copy(dir.path());
    // A damaged expert (its file no longer what the manifest recorded) and a missing evaluation.
    std::fs::write(run.join("train.code/expert.safetensors"), b"garbage").unwrap();
    std::fs::remove_dir_all(run.join("eval.coding")).unwrap();
    let out = dir.path().join("out");
    let done = report(&run, &out);
    assert!(done.status.success(), "{}", text(&done));
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(
        stderr.contains("`train.code`") && stderr.contains("`eval.coding`"),
        "{stderr}"
    );
    for file in ["report.md", "report.html"] {
        let page = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(page.contains("Missing or damaged"), "{file}");
        assert!(
            page.contains("train.code") && page.contains("do not match"),
            "{file}"
        );
        assert!(
            page.contains("eval.coding") && page.contains("not run"),
            "{file}"
        );
        assert!(
            page.contains("eval.logic"),
            "{file}: the rest still renders"
        );
    }
    elements(&std::fs::read_to_string(out.join("report.html")).unwrap());

    // A template that does not parse: refused, naming the file.
    let bad = dir.path().join("bad.jinja");
    std::fs::write(&bad, "{% for x in %}").unwrap();
    let refused = report_with(
        &run,
        &dir.path().join("bad-out"),
        &["--html-template".as_ref(), bad.as_os_str()],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused).contains(&format!("`{}`", bad.display())),
        "{}",
        text(&refused)
    );

    // Not a run directory at all: refused, nothing written.
    let none = dir.path().join("nothing");
    std::fs::create_dir(&none).unwrap();
    let refused = report(&none, &none.join("out"));
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused).contains("not a run directory"),
        "{}",
        text(&refused)
    );
    assert!(!none.join("out").exists());
}

/// Debian's chromium (installed by scripts/test) draws the report at phone width without console
/// errors (its Content-Security-Policy would log any request it refused) and prints it.
#[test]
fn headless_chromium_renders_the_report_at_phone_width_and_prints_it() {
    let bin = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("chromium is needed for this test: `apt-get install chromium` (scripts/test does)");
    let dir = tempfile::tempdir().unwrap();
    let run = fixture_copy(dir.path());
    let out = dir.path().join("out");
    assert!(report(&run, &out).status.success());
    let shot = dir.path().join("phone.png");
    let page = format!("file://{}", out.join("report.html").display());
    let profile = dir.path().join("profile");
    let done = chromium(
        bin,
        &profile,
        &page,
        &[
            "--hide-scrollbars".into(),
            "--enable-logging=stderr".into(),
            "--window-size=412,3000".into(),
            format!("--screenshot={}", shot.display()),
        ],
    );
    let log = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{log}");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    for line in log.lines() {
        assert!(
            !(line.contains("CONSOLE") || line.contains("Refused to") || line.contains("net::ERR")),
            "{line}"
        );
    }
    // And it prints (the print stylesheet keeps charts and tables whole).
    let pdf = dir.path().join("report.pdf");
    let printed = chromium(
        bin,
        &profile,
        &page,
        &[
            "--no-pdf-header-footer".into(),
            format!("--print-to-pdf={}", pdf.display()),
        ],
    );
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let pdf = std::fs::read(&pdf).unwrap();
    assert!(
        pdf.starts_with(b"%PDF") && pdf.len() > 20_000,
        "{} bytes",
        pdf.len()
    );
}
