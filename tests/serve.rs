//! `tsq serve` over raw HTTP: on a small run (the Qwen2-family fixture with one trained expert)
//! every endpoint, streaming, per-request experts equal to `tsq generate --expert`, a mixed
//! batch, bad input, keys; on a run of the real SmolLM2 (slow enough to hold the batch) chat
//! equal to `tsq generate --chat`, the queue bound, a client leaving mid-stream, draining on
//! SIGTERM, and decoding from Q8_0 copies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::Project;

struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(p: &Project, extra: &[&str]) -> Self {
        Self::spawn(p.tsq(&[&["serve", "runs/tiny", "--port", "0"], extra].concat()))
    }

    fn spawn(mut command: Command) -> Self {
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let port = loop {
            let line = lines
                .next()
                .expect("the server stopped before listening")
                .unwrap();
            log.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Self { child, port, log }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        stream
    }

    /// Sends a request and reads the whole response: status, headers (lowercase), body.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut stream = self.connect();
        send(&mut stream, method, path, headers, body);
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        Response::parse(&raw)
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, &[], body.to_string().as_bytes())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(stream: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
}

struct Response {
    status: u16,
    headers: String,
    body: String,
}

impl Response {
    fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let headers = head.to_lowercase();
        let body = if headers.contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        };
        Self {
            status,
            headers,
            body,
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

/// Starts a streamed request and reads until its first event; the reader holds the connection.
fn first_event(server: &Server, path: &str, body: &str) -> BufReader<TcpStream> {
    let mut stream = server.connect();
    send(&mut stream, "POST", path, &[], body.as_bytes());
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    reader
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// The project with a finished run `runs/tiny` that trained expert `letters` and made a
/// prompt-based router between it and the base model.
fn served_run() -> Project {
    let p = Project::new();
    let template = crate::common::repo().join("templates/classifiers/paper.jinja");
    let router = format!(
        "adaptations:\n  router:\n    strategy: prompt\n    template: {}\n    \
         labels: [letters, other]\n    calibration: 2\n    check: 2\n",
        template.display()
    );
    crate::arch::run_the_loop(&p, "qwen2", "f32", &router);
    p
}

fn generate(p: &Project, expert: bool, prompt: &str, tokens: usize) -> String {
    let model = crate::common::repo().join("tests/fixtures/arch/qwen2");
    let model = model.to_str().unwrap().to_string();
    let expert_file = "runs/tiny/train.letters/expert.safetensors";
    let n = tokens.to_string();
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--max-new-tokens",
        &n,
        prompt,
    ];
    if expert {
        args.extend(["--expert", expert_file]);
    }
    let out = p.run_ok(&args);
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

fn completion(model: &str, prompt: &str, tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0})
}

/// The models, greedy answers equal to `tsq generate` (with and without the expert), one
/// streamed answer equal to the whole one, and several requests at once, each with its model.
#[test]
fn serves_the_run_as_generate_answers() {
    let p = served_run();
    let server = Server::start(&p, &[]);
    assert_eq!(server.request("GET", "/health", &[], b"").body, "ok");
    let models = server.request("GET", "/v1/models", &[], b"").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "tiny:letters", "tiny:router"]);
    assert_eq!(models["data"][1]["parent"], "tiny");

    let prompts = ["t5 t6 t7", "t40 t41 t2 t9 t77 t13 t4", "t11"];
    let mut expected = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        for (model, expert) in [("tiny", false), ("tiny:letters", true)] {
            let tokens = 6 + 3 * i;
            let ours = server
                .post("/v1/completions", &completion(model, prompt, tokens))
                .json();
            let theirs = generate(&p, expert, prompt, tokens);
            assert_eq!(ours["choices"][0]["text"], theirs, "{model} on {prompt}");
            assert_eq!(ours["usage"]["completion_tokens"], tokens);
            expected.push((model, prompt, tokens, theirs));
        }
    }

    // The adaptation: its choice and answer are `tsq generate --run --adapt`'s.
    let ours = server.request(
        "POST",
        "/v1/completions",
        &[],
        completion("tiny:router", prompts[1], 7)
            .to_string()
            .as_bytes(),
    );
    let generated = p.run_ok(&[
        "generate",
        "--run",
        "runs/tiny",
        "--adapt",
        "router",
        "--format",
        "json",
        "--max-new-tokens",
        "7",
        prompts[1],
    ]);
    let theirs: Value = serde_json::from_slice(&generated.stdout).unwrap();
    let theirs = &theirs["generations"][0];
    let body = ours.json();
    assert_eq!(body["choices"][0]["text"], theirs["text"]);
    assert_eq!(body["tsq"]["choice"], theirs["adaptation"]);
    let target = theirs["adaptation"]["target"].as_str().unwrap();
    assert!(
        ours.headers.contains(&format!("x-tsq-expert: {target}")),
        "{}",
        ours.headers
    );

    // A request's own mixture: all of one expert is that expert, all of `base` the base model;
    // a half-and-half one answers too, saying what mixed it.
    let mixed = |experts: Value| {
        let mut ask = completion("tiny", prompts[1], 7);
        ask["tsq"] = json!({"experts": experts});
        server.post("/v1/completions", &ask)
    };
    let letters = server
        .post(
            "/v1/completions",
            &completion("tiny:letters", prompts[1], 7),
        )
        .json();
    let base = server
        .post("/v1/completions", &completion("tiny", prompts[1], 7))
        .json();
    assert_eq!(
        mixed(json!({"letters": 1.0})).json()["choices"],
        letters["choices"]
    );
    // A weight of 0 leaves its expert out (a mixture that ignored the weights would not).
    assert_eq!(
        mixed(json!({"letters": 1.0, "base": 0.0})).json()["choices"],
        letters["choices"]
    );
    assert_eq!(
        mixed(json!({"base": 1.0})).json()["choices"],
        base["choices"]
    );
    let half = mixed(json!({"letters": 0.5, "base": 0.5}));
    assert_eq!(half.status, 200, "{}", half.body);
    assert!(
        half.headers.contains("x-tsq-expert: mixture"),
        "{}",
        half.headers
    );
    assert_eq!(
        half.json()["tsq"]["choice"]["experts"],
        json!({"base": 0.5, "letters": 0.5})
    );
    for (model, experts) in [
        ("tiny:letters", json!({"letters": 1.0})),
        ("tiny", json!({"nobody": 1.0})),
        ("tiny", json!({})),
    ] {
        let mut ask = completion(model, prompts[1], 3);
        ask["tsq"] = json!({"experts": experts});
        let refused = server.post("/v1/completions", &ask);
        assert_eq!(refused.status, 400, "{}", refused.body);
        assert_eq!(
            refused.json()["error"]["param"],
            "tsq.experts",
            "{}",
            refused.body
        );
    }

    let mut stream_ask = completion("tiny:letters", prompts[1], 9);
    stream_ask["stream"] = json!(true);
    stream_ask["stream_options"] = json!({"include_usage": true});
    let streamed = server.post("/v1/completions", &stream_ask);
    assert!(
        streamed.headers.contains("text/event-stream"),
        "{}",
        streamed.headers
    );
    let events = streamed.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, expected[3].3);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 9);

    // All at once: they share the decode batch, each answered by its own model.
    let answers: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = expected
            .iter()
            .map(|(model, prompt, tokens, theirs)| {
                let server = &server;
                s.spawn(move || {
                    let ours = server
                        .post("/v1/completions", &completion(model, prompt, *tokens))
                        .json();
                    (
                        ours["choices"][0]["text"].as_str().unwrap().to_string(),
                        theirs.clone(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (ours, theirs) in answers {
        assert_eq!(ours, theirs);
    }

    let metrics = server.request("GET", "/metrics", &[], b"").body;
    for line in [
        "tsq_requests_total{model=\"tiny:letters\",status=\"200\"} 8",
        "tsq_requests_total{model=\"-\",status=\"400\"} 3",
        "tsq_expert_requests_total{expert=\"letters\"} 9",
        "tsq_expert_requests_total{expert=\"base\"} 7",
        "tsq_expert_requests_total{expert=\"mixture\"} 4",
        "tsq_queue_depth 0",
        "tsq_time_to_first_token_seconds_count 20",
        "tsq_first_pass_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

/// Bad requests get OpenAI-shaped errors with the right status; the server stays up.
#[test]
fn bad_requests_get_clean_errors() {
    let p = served_run();
    std::fs::write(p.path().join("key"), "sk-test-123\n").unwrap();
    let server = Server::start(&p, &["--api-key-file", "key", "--header-timeout", "1"]);
    // A client sending its headers slowly is disconnected after the timeout.
    let mut slow = server.connect();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let clock = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = clock.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    let auth = [("authorization", "Bearer sk-test-123")];
    let chat = |body: &[u8]| server.request("POST", "/v1/chat/completions", &auth, body);
    let cases: Vec<(Response, u16, &str)> = vec![
        (server.request("GET", "/v1/models", &[], b""), 401, "invalid_api_key"),
        (
            server.request("GET", "/v1/models", &[("authorization", "Bearer sk-test-124")], b""),
            401,
            "invalid_api_key",
        ),
        (chat(b"{not json"), 400, "invalid_request"),
        (chat(&[0xff, 0xfe, 0x00]), 400, "invalid_request"),
        (chat(br#"{"model": "tiny", "messages": []}"#), 400, "invalid_request"),
        (chat(br#"{"model": "nope", "messages": [{"role": "user", "content": "x"}]}"#), 404, "model_not_found"),
        (
            chat(br#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true}"#),
            400,
            "invalid_request",
        ),
        // The fixture has no chat template.
        (chat(br#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}]}"#), 400, "invalid_request"),
        (chat(&vec![b' '; 2 << 20]), 413, "body_too_large"),
        (
            server.request("POST", "/v1/completions", &auth, br#"{"model": "tiny", "prompt": "t1", "max_tokens": 100000}"#),
            400,
            "invalid_request",
        ),
    ];
    for (i, (response, status, code)) in cases.into_iter().enumerate() {
        assert_eq!(response.status, status, "case {i}: {}", response.body);
        let body = response.json();
        assert_eq!(body["error"]["code"], code, "case {i}: {body}");
        assert!(
            !response.body.contains("sk-test-123"),
            "case {i} echoes the key"
        );
    }
    let ok = server.request(
        "POST",
        "/v1/completions",
        &auth,
        completion("tiny", "t5", 3).to_string().as_bytes(),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
}

/// A request's `chat_template_kwargs` (vLLM's field, the openai client's `extra_body`) reach the
/// chat template over the run's own: the prompt is one token longer where the template's
/// variable makes it so.
#[test]
fn chat_template_kwargs_of_a_request_reach_the_template() {
    let p = Project::new();
    crate::arch::thinking_model(&p);
    p.run_ok(&["run", "chat.yaml"]);
    let server = Server::start(&p, &[]);
    let prompt_tokens = |kwargs: Value| {
        let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "t9"}],
            "max_tokens": 1});
        if !kwargs.is_null() {
            body["chat_template_kwargs"] = kwargs;
        }
        let response = server.post("/v1/chat/completions", &body);
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    // The run says enable_thinking: false (" t5" appended); a request may say otherwise.
    assert_eq!(prompt_tokens(Value::Null), 2);
    assert_eq!(prompt_tokens(json!({"enable_thinking": true})), 1);
    assert_eq!(prompt_tokens(json!({"enable_thinking": false})), 2);
    let refused = server.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "t9"}],
            "chat_template_kwargs": {"messages": []}}),
    );
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.json()["error"]["param"], "chat_template_kwargs");
}

/// On the real SmolLM2: a chat answer equal to `tsq generate --chat`; with one sequence in the
/// batch and one request waiting, the next is refused with 429; a client that leaves mid-stream
/// frees its row; SIGTERM lets the answer in flight finish.
#[test]
fn real_model_chat_queue_bound_disconnects_and_draining() {
    let (p, model) = Project::with_real_run();
    let tsq = |args: &[&str]| p.real_tsq(args);
    let server = Server::spawn(tsq(&[
        "serve",
        "runs/tiny",
        "--port",
        "0",
        "--max-batch",
        "1",
        "--max-queue",
        "1",
    ]));

    let question = "What is the capital of France?";
    let ours = server.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": question}],
                "max_tokens": 12, "temperature": 0}),
    );
    let generated = tsq(&[
        "generate",
        "--model",
        &model,
        "--chat",
        "--max-new-tokens",
        "12",
        question,
    ])
    .output()
    .unwrap();
    let theirs = String::from_utf8_lossy(&generated.stdout)
        .trim_end()
        .to_string();
    assert_eq!(
        ours.json()["choices"][0]["message"]["content"],
        theirs,
        "{}",
        ours.body
    );

    // Log-probabilities of a completion are those `tsq score` gives its text after the prompt,
    // and the greedy token is the likeliest of each position's alternatives.
    let (answer, expected) = completion_beside_f32_scores(&server, &p, &model, 2);
    let logprobs = &answer["choices"][0]["logprobs"];
    let text = answer["choices"][0]["text"].as_str().unwrap();
    let tokens: String = logprobs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, text);
    let given = logprobs["token_logprobs"].as_array().unwrap();
    assert_eq!(given.len(), expected.len(), "{logprobs}");
    for (k, (a, &b)) in given.iter().zip(&expected).enumerate() {
        let a = a.as_f64().unwrap();
        assert!((a - b).abs() < 1e-3, "token {k}: {a} vs {b}");
        let best = logprobs["top_logprobs"][k]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            (best - a).abs() < 1e-9,
            "token {k}: greedy {a}, best {best}"
        );
    }

    // The official client (README's example), whole and streamed.
    let venv = std::env::var_os("TSQ_TEST_VENV").map_or_else(
        || std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tsq-test-venv"),
        std::path::PathBuf::from,
    );
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no {}: run scripts/test, which installs the openai client",
        python.display()
    );
    let base_url = format!("http://127.0.0.1:{}/v1", server.port);
    let example = crate::common::repo().join("scripts/serve_example.py");
    let out = Command::new(&python)
        .arg(example)
        .args([&base_url, "tiny", question])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", crate::common::text(&out));
    let client: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(client["models"], json!(["tiny"]));
    assert_eq!(client["answer"], theirs);
    assert_eq!(client["streamed"], theirs);
    assert_eq!(
        client["usage"]["completion_tokens"],
        ours.json()["usage"]["completion_tokens"]
    );
    // The client asked what was asked first: its prompts came from the prefix cache, all but
    // their last token, and the answers stayed the same.
    let metrics = server.request("GET", "/metrics", &[], b"").body;
    let total = |name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} ")));
        line.and_then(|l| l.split(' ').nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    let chat_tokens = ours.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        total("tsq_prompt_tokens_cached_total") >= 2 * (chat_tokens - 1),
        "{metrics}"
    );

    let long = |tokens: usize| {
        json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
               "max_tokens": tokens, "temperature": 0, "stream": true})
        .to_string()
    };
    let path = "/v1/chat/completions";
    // A stream holding the batch's one place.
    let first = first_event(&server, path, &long(200));
    // A second one waits in the queue; a third finds it full.
    let mut second = server.connect();
    send(&mut second, "POST", path, &[], long(5).as_bytes());
    std::thread::sleep(Duration::from_millis(300));
    let third = server.post("/v1/completions", &completion("tiny", "Hello", 2));
    assert_eq!(third.status, 429, "{}", third.body);
    assert!(
        third.headers.contains("retry-after: 1"),
        "{}",
        third.headers
    );
    // The first client leaves: its row goes, the waiting request is answered.
    drop(first);
    let mut raw = Vec::new();
    second.read_to_end(&mut raw).unwrap();
    let second = Response::parse(&raw);
    assert_eq!(
        second.events().last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        second.body
    );

    // SIGTERM with a stream in flight: it still ends with [DONE], then the server exits 0.
    let mut reader = first_event(&server, path, &long(40));
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "{rest}");
    let mut server = server;
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}\n{}", server.log.lock().unwrap());
    assert!(server.log.lock().unwrap().contains("draining"));
}

/// `--decode-q8` on the real SmolLM2: the chat answer equals `tsq generate --chat --decode-q8`'s
/// (the same copies, the same steps), and a completion's log-probabilities differ from the f32
/// ones `tsq score` gives (the copies are used) by no more than the quantized path's tolerance.
#[test]
fn real_model_decodes_from_q8_copies_as_generate_does() {
    let (p, model) = Project::with_real_run();
    let tsq = |args: &[&str]| p.real_tsq(args);
    let server = Server::spawn(tsq(&["serve", "runs/tiny", "--port", "0", "--decode-q8"]));
    let question = "What is the capital of France?";
    let ours = server.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": question}],
                "max_tokens": 12, "temperature": 0}),
    );
    let generate = ["generate", "--model", &model, "--chat", "--decode-q8"];
    let generated = tsq(&[&generate[..], &["--max-new-tokens", "12", question]].concat())
        .output()
        .unwrap();
    let theirs = String::from_utf8_lossy(&generated.stdout);
    let answer = &ours.json()["choices"][0]["message"]["content"];
    assert_eq!(answer, theirs.trim_end(), "{}", ours.body);
    assert!(theirs.contains("Paris"), "{theirs}");

    let (answer, f32_logprobs) = completion_beside_f32_scores(&server, &p, &model, 1);
    let q8_logprobs = answer["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(q8_logprobs.len(), f32_logprobs.len(), "{answer}");
    let largest = q8_logprobs
        .iter()
        .zip(&f32_logprobs)
        .map(|(a, b)| (a.as_f64().unwrap() - b).abs())
        .fold(0f64, f64::max);
    assert!(largest > 1e-4, "the Q8_0 copies were not used");
    assert!(largest < 0.25, "log-probabilities {largest} from f32's");
}

/// A greedy completion of "The capital of France is" (6 tokens, `logprobs` alternatives) from
/// `server`, and the log-probabilities `tsq score` gives its text in f32.
fn completion_beside_f32_scores(
    server: &Server,
    p: &Project,
    model: &str,
    logprobs: usize,
) -> (Value, Vec<f64>) {
    let prompt = "The capital of France is";
    let answer = server
        .post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                    "logprobs": logprobs}),
        )
        .json();
    let text = answer["choices"][0]["text"].as_str().unwrap();
    let args = [
        "score", "--model", model, "--prompt", prompt, "--format", "json",
    ];
    let scored = p
        .real_tsq(&[&args[..], &["--continuation", text]].concat())
        .output()
        .unwrap();
    let scored: Value = serde_json::from_slice(&scored.stdout).unwrap();
    let logprobs = scored["scores"][0]["logprobs"].as_array().unwrap();
    let logprobs = logprobs.iter().map(|v| v.as_f64().unwrap()).collect();
    (answer, logprobs)
}
