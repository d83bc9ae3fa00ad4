//! The model's side of the server: one thread owns the run's model (with a table of every
//! expert the run trained and every few-shot mixture it found, chosen per sequence), the
//! adaptations' first passes, and a continuous-batching [`Decoder`]. Requests arrive over a
//! bounded channel, join the batch between decoding steps (up to `max_batch` sequences) and get
//! their text back over a channel of their own; a request whose receiver is gone (its client
//! disconnected) leaves the batch at the next step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};

use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::adapt::spec::BASE;
use crate::assets::TsqHome;
use crate::model::Model;
use crate::model::chat::ChatTemplate;
use crate::model::decoder::{Decoder, Event, Joining};
use crate::model::generate::{GenerateOptions, Generation, TokenLogprob};
use crate::model::tokenizer::Tokenizer;
use crate::stages::adapt::adapter::{Adapter, Choice};
use crate::stages::ids;
use crate::svf::ExpertTable;

/// What the server offers, known once the engine has loaded the run.
pub struct Catalog {
    /// The run's pipeline name: the base model's id, and the prefix of the others.
    pub run: String,
    pub models: Vec<(String, Route)>,
    pub tokenizer: Arc<Tokenizer>,
    pub chat: Option<ChatTemplate>,
    /// Longest prompt plus new tokens a sequence may have.
    pub span: usize,
}

impl Catalog {
    pub fn route(&self, model: &str) -> Option<&Route> {
        self.models
            .iter()
            .find(|(id, _)| id == model)
            .map(|(_, r)| r)
    }

    /// The names of the run's trained experts.
    pub fn experts(&self) -> Vec<&str> {
        self.models
            .iter()
            .filter(|(_, route)| matches!(route, Route::Expert(_)))
            .filter_map(|(id, _)| id.split_once(':').map(|(_, name)| name))
            .collect()
    }
}

/// Who answers a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    Base,
    /// A row of the model's expert table.
    Expert(u32),
    /// An adaptation: its first pass picks (or mixes) the expert per request.
    Adaptation(String),
    /// The request's own mixture of the run's experts (`base` for the base model): effective
    /// scales Σ α e, a row of the table made on first use.
    Mixture(Vec<(String, f64)>),
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub route: Route,
    /// What an adaptation's first pass reads.
    pub first_pass: String,
    pub opts: GenerateOptions,
    pub n: usize,
    pub events: UnboundedSender<JobEvent>,
}

pub enum JobEvent {
    /// An adaptation's first-pass decision, as `tsq classify`/`chat --adapt` report it.
    Chosen {
        choice: Value,
        answered_by: String,
    },
    Text {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        index: usize,
        generation: Generation,
    },
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Adapter(#[from] crate::stages::adapt::adapter::AdapterError),
    #[error(transparent)]
    Read(#[from] crate::fsutil::ReadError),
    #[error("building the table of experts: {0}")]
    Experts(#[from] crate::svf::SvfError),
    #[error("quantizing the weights for decoding: {0}")]
    Quantize(crate::model::error::ModelError),
    #[error("the engine thread stopped before it was ready")]
    Gone,
}

/// How much the engine takes on at once.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests waiting beyond those in the batch at most; beyond, a 429.
    pub max_queue: usize,
    /// Bytes of prompts' keys and values kept for later prompts that start the same way.
    pub prefix_cache: usize,
}

/// Where requests go to the engine: at most `max_batch + max_queue` of them are open (being
/// decoded or waiting) at once. Counting open requests, not the channel's length, keeps a burst
/// that arrives while the engine is busy prefilling from being refused though the batch has room.
pub struct Queue {
    jobs: Sender<Job>,
    open: Arc<AtomicUsize>,
    limit: usize,
}

/// A request's place among the open ones, given back when its answer is dropped (finished,
/// failed, or its client gone).
pub struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a job was not taken.
pub enum Refused {
    /// As many requests are open as the engine takes: retry later.
    Full,
    /// The engine has stopped.
    Gone,
}

impl Queue {
    /// Sends `job` to the engine when there is a place for it.
    pub fn submit(&self, job: Job) -> Result<Place, Refused> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.limit).then_some(open + 1)
            })
            .map_err(|_| Refused::Full)?;
        let place = Place(Arc::clone(&self.open));
        self.jobs.send(job).map_err(|_| Refused::Gone)?;
        Ok(place)
    }
}

/// Loads the run in `run_dir` on a thread of its own and returns what it offers, where to send
/// jobs, and the thread. With `decode_q8`, sequences decode from Q8_0 copies of the weights that
/// are not SVF targets in steps of few rows (`Transformer::quantize_for_decoding`); the
/// adaptations' first passes keep the f32 weights.
pub fn start(
    run_dir: &Path,
    home: TsqHome,
    capacity: Capacity,
    decode_q8: bool,
    metrics: Arc<Metrics>,
) -> Result<(Catalog, Queue, std::thread::JoinHandle<()>), EngineError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    let queue = Queue {
        jobs: jobs_tx,
        open: Arc::new(AtomicUsize::new(0)),
        limit: capacity.max_batch + capacity.max_queue,
    };
    let run_dir = run_dir.to_path_buf();
    let thread = std::thread::spawn(move || {
        crate::model::compute_on_this_thread();
        match Engine::load(&run_dir, home, decode_q8, metrics) {
            Ok((engine, catalog)) => {
                if ready_tx.send(Ok(catalog)).is_ok() {
                    engine.run(jobs_rx, capacity);
                }
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    let catalog = ready_rx.recv().map_err(|_| EngineError::Gone)??;
    Ok((catalog, queue, thread))
}

struct Engine {
    /// The run's model as loaded; sequences decode with the table's when the run has experts.
    base: Model,
    table: Option<ExpertTable>,
    /// Rows made for requests' mixtures, by mixture ([`mixture_key`]).
    mixtures: BTreeMap<String, u32>,
    adapters: BTreeMap<String, Adapter>,
    /// Table row of each trained expert (by name) and each few-shot adaptation (`adapt:NAME`);
    /// row 0 is the base model.
    rows: BTreeMap<String, u32>,
    metrics: Arc<Metrics>,
}

/// Where a sequence's text goes.
struct Listener {
    events: UnboundedSender<JobEvent>,
    index: usize,
}

impl Engine {
    fn load(
        run_dir: &Path,
        home: TsqHome,
        decode_q8: bool,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Catalog), EngineError> {
        let (spec, _) = crate::stages::run_pipeline(run_dir)?;
        let run = crate::exec::RunDir::read_only(run_dir);
        let finished = |id: &crate::dag::StageId| run.finished(id.as_str()).is_some();
        let mut base = crate::stages::adapt::adapter::run_model(run_dir)?;
        // The adaptations' first passes run on the same weights (a clone shares them).
        let shared = Rc::new(base.clone());
        let mut files: Vec<(String, PathBuf)> = Vec::new();
        let mut models = vec![(spec.name.clone(), Route::Base)];
        for name in spec.experts.keys().filter(|e| finished(&ids::train(e))) {
            let dir = run.stage_dir(ids::train(name).as_str());
            files.push((name.clone(), dir.join(crate::stages::train::EXPERT_FILE)));
            models.push((
                format!("{}:{name}", spec.name),
                Route::Expert(files.len() as u32),
            ));
        }
        let mut adapters = BTreeMap::new();
        for (name, adaptation) in &spec.adaptations {
            if !finished(&ids::adapt(name)) {
                continue;
            }
            if adaptation.routing().is_none() {
                let dir = run.stage_dir(ids::adapt(name).as_str());
                files.push((
                    format!("adapt:{name}"),
                    dir.join(crate::stages::train::EXPERT_FILE),
                ));
            }
            let adapter = Adapter::with_base(run_dir, name, Rc::clone(&shared), home.clone())?;
            adapters.insert(name.clone(), adapter);
            models.push((
                format!("{}:{name}", spec.name),
                Route::Adaptation(name.clone()),
            ));
        }
        let paths: Vec<&Path> = files.iter().map(|(_, p)| p.as_path()).collect();
        let mut table = match paths.is_empty() {
            true => None,
            false => Some(ExpertTable::new(&base, &paths, &home)?),
        };
        let rows = files
            .iter()
            .enumerate()
            .map(|(k, (label, _))| (label.clone(), k as u32 + 1))
            .collect();
        let catalog = Catalog {
            run: spec.name.clone(),
            models,
            tokenizer: Arc::clone(&base.tokenizer),
            chat: base.chat.clone(),
            span: base.transformer.config.attention_span(),
        };
        if decode_q8 {
            // After the first passes took their copy of `base`, and on the model sequences
            // decode with: the table's when there is one.
            let decoding = table.as_mut().map_or(&mut base, |t| &mut t.model);
            decoding.decode_from_q8().map_err(EngineError::Quantize)?;
        }
        Ok((
            Self {
                base,
                table,
                mixtures: BTreeMap::new(),
                adapters,
                rows,
                metrics,
            },
            catalog,
        ))
    }

    fn run(mut self, jobs: Receiver<Job>, capacity: Capacity) {
        let mut decoder = Decoder::new(self.model().clone(), capacity.prefix_cache);
        let mut listeners: BTreeMap<u64, Listener> = BTreeMap::new();
        let mut next_id = 0u64;
        let mut closed = false;
        loop {
            let room = capacity.max_batch.saturating_sub(decoder.len());
            let Some(arrived) = arrivals(&jobs, decoder.is_empty(), room, &mut closed) else {
                return;
            };
            self.metrics
                .queued
                .fetch_sub(arrived.len(), Ordering::Relaxed);
            let rows = self.table.as_ref().map_or(0, ExpertTable::len);
            let joining = self.admit(arrived, &mut listeners, &mut next_id);
            if self.table.as_ref().map_or(0, ExpertTable::len) != rows {
                decoder.replace_model(self.model().clone());
            }
            let joined: Vec<u64> = joining.iter().map(|j| j.id).collect();
            if let Err(e) = decoder.join(joining) {
                fail(&joined, &mut listeners, &e.to_string());
            }
            let mut gone = Vec::new();
            let stepped = decoder.step(&mut |event| match event {
                Event::Text { id, text, logprobs } => {
                    if let Some(l) = listeners.get(&id) {
                        let index = l.index;
                        let event = JobEvent::Text {
                            index,
                            text,
                            logprobs,
                        };
                        if l.events.send(event).is_err() {
                            gone.push(id);
                        }
                    }
                }
                Event::Finished { id, generation } => {
                    self.metrics.tokens(generation.token_ids.len());
                    if let Some(l) = listeners.remove(&id) {
                        let index = l.index;
                        let _ = l.events.send(JobEvent::Finished { index, generation });
                    }
                }
            });
            if let Err(e) = stepped {
                // The batch is lost: every live request hears why, and the engine starts afresh.
                for (_, l) in std::mem::take(&mut listeners) {
                    let _ = l.events.send(JobEvent::Failed(e.to_string()));
                }
                decoder.clear();
                continue;
            }
            for id in gone {
                listeners.remove(&id);
                decoder.cancel(id);
            }
            self.metrics.batch.store(decoder.len(), Ordering::Relaxed);
            let prefixes = decoder.prefix_stats();
            let m = &self.metrics;
            m.prompt_tokens.store(prefixes.prompt, Ordering::Relaxed);
            m.cached_prompt_tokens
                .store(prefixes.cached, Ordering::Relaxed);
            if closed && decoder.is_empty() {
                return;
            }
        }
    }

    /// Runs the first passes of `jobs` asking an adaptation (batched per adaptation), tells
    /// each what was chosen, and makes their sequences.
    fn admit(
        &mut self,
        jobs: Vec<Job>,
        listeners: &mut BTreeMap<u64, Listener>,
        next_id: &mut u64,
    ) -> Vec<Joining> {
        let mut experts: Vec<Option<Option<u32>>> = jobs
            .iter()
            .map(|j| match &j.route {
                Route::Base => Some(self.base_row()),
                Route::Expert(row) => Some(Some(*row)),
                Route::Adaptation(_) | Route::Mixture(_) => None,
            })
            .collect();
        for (i, job) in jobs.iter().enumerate() {
            let Route::Mixture(mix) = &job.route else {
                continue;
            };
            match self.mixture_row(mix) {
                Ok(row) => {
                    experts[i] = Some(Some(row));
                    self.metrics.answered_by(MIXTURE);
                    let _ = job.events.send(JobEvent::Chosen {
                        choice: serde_json::json!({"strategy": "request", "experts": mix_object(mix)}),
                        answered_by: MIXTURE.into(),
                    });
                }
                Err(why) => {
                    let _ = job.events.send(JobEvent::Failed(why));
                }
            }
        }
        let names: std::collections::BTreeSet<String> = jobs
            .iter()
            .filter_map(|j| match &j.route {
                Route::Adaptation(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        for name in names {
            let asking: Vec<usize> = (0..jobs.len())
                .filter(|&i| jobs[i].route == Route::Adaptation(name.clone()))
                .collect();
            let inputs: Vec<String> = asking.iter().map(|&i| jobs[i].first_pass.clone()).collect();
            let clock = std::time::Instant::now();
            let chosen = self.adapters[&name].choose(&inputs);
            self.metrics.first_pass(clock.elapsed());
            match chosen {
                Ok(choices) => {
                    for (&i, choice) in asking.iter().zip(choices) {
                        let row = self.row_for(&name, &choice);
                        experts[i] = Some(row);
                        self.metrics.answered_by(&choice.answered_by());
                        let _ = jobs[i].events.send(JobEvent::Chosen {
                            choice: serde_json::to_value(&choice).unwrap_or_default(),
                            answered_by: choice.answered_by(),
                        });
                    }
                }
                Err(e) => {
                    for &i in &asking {
                        let _ = jobs[i].events.send(JobEvent::Failed(e.to_string()));
                    }
                }
            }
        }
        let mut joining = Vec::new();
        for (job, expert) in jobs.into_iter().zip(experts) {
            let Some(expert) = expert else { continue };
            match &job.route {
                Route::Base => self.metrics.answered_by(BASE),
                Route::Expert(row) => {
                    let name = self.rows.iter().find(|(_, r)| *r == row).map(|(n, _)| n);
                    self.metrics.answered_by(name.map_or(BASE, String::as_str));
                }
                Route::Adaptation(_) | Route::Mixture(_) => {}
            }
            for index in 0..job.n {
                *next_id += 1;
                listeners.insert(
                    *next_id,
                    Listener {
                        events: job.events.clone(),
                        index,
                    },
                );
                joining.push(Joining {
                    id: *next_id,
                    prompt: job.prompt.clone(),
                    expert,
                    opts: job.opts.clone(),
                    sample: index,
                });
            }
        }
        joining
    }

    /// The table row that answers after adaptation `name` chose `choice`.
    fn row_for(&self, name: &str, choice: &Choice) -> Option<u32> {
        let row = match choice {
            Choice::Mixed { .. } => self.rows.get(&format!("adapt:{name}")),
            Choice::Routed { target, .. } => self.rows.get(target),
        };
        row.copied().or(self.base_row())
    }

    /// The table row of mixture `mix` (expert names or `base`, with weights), made on first use.
    fn mixture_row(&mut self, mix: &[(String, f64)]) -> Result<u32, String> {
        let key = mixture_key(mix);
        if let Some(&row) = self.mixtures.get(&key) {
            return Ok(row);
        }
        if self.mixtures.len() >= MAX_MIXTURES {
            return Err(format!(
                "this server holds {MAX_MIXTURES} mixtures already; reuse one"
            ));
        }
        let weights = mix
            .iter()
            .map(|(name, alpha)| match name.as_str() {
                BASE => Ok((0, *alpha)),
                _ => self
                    .rows
                    .get(name)
                    .map(|&r| (r, *alpha))
                    .ok_or_else(|| format!("no expert `{name}`")),
            })
            .collect::<Result<Vec<_>, String>>()?;
        let table = self.table.as_mut().ok_or("the run has no expert to mix")?;
        let row = table.push_mixture(&weights).map_err(|e| e.to_string())?;
        self.mixtures.insert(key, row);
        Ok(row)
    }

    /// The base model's row: 0 of the table, or none when the model holds no table.
    fn base_row(&self) -> Option<u32> {
        self.table.as_ref().map(|_| 0)
    }

    /// The model sequences decode with: the table's, or the base model when the run has no
    /// expert.
    fn model(&self) -> &Model {
        self.table.as_ref().map_or(&self.base, |t| &t.model)
    }
}

/// The jobs to take in now, with room for `room` sequences: when `idle`, waits for the first
/// one (`None`: the server is gone and nothing is left to do); then whatever is already
/// waiting. Sets `closed` once the server has gone.
fn arrivals(jobs: &Receiver<Job>, idle: bool, room: usize, closed: &mut bool) -> Option<Vec<Job>> {
    let mut arrived = Vec::new();
    let mut room = room;
    if idle {
        let job = jobs.recv().ok()?;
        room = room.saturating_sub(job.n);
        arrived.push(job);
    }
    while room > 0 && !*closed {
        match jobs.try_recv() {
            Ok(job) => {
                room = room.saturating_sub(job.n);
                arrived.push(job);
            }
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => *closed = true,
        }
    }
    Some(arrived)
}

/// What answers a request's own mixture, in its `tsq` object, header and metrics.
const MIXTURE: &str = "mixture";

/// Mixtures one server makes at most (each a row of every target's table).
const MAX_MIXTURES: usize = 64;

/// A mixture's identity: its names and weights in name order.
fn mixture_key(mix: &[(String, f64)]) -> String {
    let mut parts: Vec<String> = mix.iter().map(|(n, a)| format!("{n}={a:?}")).collect();
    parts.sort();
    parts.join(",")
}

fn mix_object(mix: &[(String, f64)]) -> Value {
    Value::Object(
        mix.iter()
            .map(|(n, a)| (n.clone(), serde_json::json!(a)))
            .collect(),
    )
}

/// Tells the listeners of sequences `ids` that they failed, with `why`.
fn fail(ids: &[u64], listeners: &mut BTreeMap<u64, Listener>, why: &str) {
    for id in ids {
        if let Some(l) = listeners.remove(id) {
            let _ = l.events.send(JobEvent::Failed(why.to_string()));
        }
    }
}
