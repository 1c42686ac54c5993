//! `etcd-sim`: what many mesh nodes cost etcd, measured against a real etcd from one process.
//!
//! Simulates `--nodes` nodes with `--instances` instances each, the way the etcd backend
//! (`mesh_router::cluster::etcd`) uses etcd: one lease per node, one key per instance under it
//! (same key layout and value size), one keep-alive stream per node sending every third of the
//! lease's time to live, one watch of the prefix per node. Then measures, each phase bounded in
//! count and time:
//!
//! 1. registration: leases granted and keys put per second, and the time for all of them;
//! 2. keep-alive: the rate etcd answers keep-alives at over one stream per node, beside the
//!    rate the nodes need (`nodes / (ttl / 3)`);
//! 3. a full list of the prefix (what a node does when it resyncs): time and bytes;
//! 4. watch fan-out: `--watchers` watches of the prefix, `--churn` puts; events delivered per
//!    second and the time until every watcher saw every put.
//!
//! With no `--endpoint` it starts Debian's `etcd` on loopback (free ports, a temporary data
//! directory) and stops it with SIGTERM afterwards.

#[path = "../etcd.rs"]
mod etcd;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use mesh::{Address, Channel};
use mesh_router::cluster::etcd::pb;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser, Debug)]
#[command(about = "What N mesh nodes x M instances cost etcd, measured")]
struct Args {
    /// etcd endpoint (host:port); none: start a local etcd.
    #[arg(long)]
    endpoint: Option<String>,
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Instances per node.
    #[arg(long, default_value_t = 100)]
    instances: usize,
    /// Lease time to live, seconds (the backend's default is 10).
    #[arg(long, default_value_t = 10)]
    ttl: u64,
    /// Keep-alive rounds (one keep-alive per node each).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Watches of the prefix for the fan-out phase (a real cluster has one per node).
    #[arg(long, default_value_t = 200)]
    watchers: usize,
    /// Puts during the fan-out phase.
    #[arg(long, default_value_t = 500)]
    churn: usize,
    /// Connections to etcd the simulated nodes share.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Give up on any phase after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    phase_timeout: Duration,
}

const PREFIX: &str = "/mesh-sim/v1/";

fn key(service: usize, node: usize, instance: usize) -> Vec<u8> {
    format!("{PREFIX}services/plugin.s{service}/node-{node}/s{service}-{instance}").into_bytes()
}

fn value(node: usize, instance: usize) -> Vec<u8> {
    format!(
        r#"{{"node":"node-{node}","router":"10.{}.{}.{}:7700","instance":"s-{instance}"}}"#,
        node / 65536 % 256,
        node / 256 % 256,
        node % 256
    )
    .into_bytes()
}

fn prefix_end() -> Vec<u8> {
    let mut end = PREFIX.as_bytes().to_vec();
    *end.last_mut().expect("not empty") += 1;
    end
}

fn rate(count: usize, took: Duration) -> String {
    format!("{:.0}/s", count as f64 / took.as_secs_f64().max(1e-9))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (endpoint, _etcd) = match &args.endpoint {
        Some(endpoint) => (endpoint.clone(), None),
        None => {
            if !etcd::installed() {
                anyhow::bail!(
                    "etcd is not installed (on Debian: apt-get install -y etcd-server), or pass --endpoint"
                );
            }
            let etcd = etcd::start().await?;
            (etcd.endpoint.clone(), Some(etcd))
        }
    };
    let channels: Vec<Channel> = (0..args.connections.max(1))
        .map(|_| Channel::to_server(Address::Tcp(endpoint.clone())))
        .collect();
    let channel = |i: usize| channels[i % channels.len()].clone();
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let keys = args.nodes * args.instances;
    println!(
        "etcd-sim: {} nodes x {} instances = {keys} keys, lease ttl {}s, etcd at {endpoint}",
        args.nodes, args.instances, args.ttl
    );

    // 1. Registration.
    let started = Instant::now();
    let mut leases = vec![0i64; args.nodes];
    let mut grants = JoinSet::new();
    for node in 0..args.nodes {
        let mut lease = pb::lease_client::LeaseClient::new(channel(node));
        let limit = limit.clone();
        // Long enough to outlive the run: these nodes keep their leases alive only in phase 2
        // (a real node keeps its own alive all along; the rate is what phase 2 measures).
        let ttl = (args.ttl as i64).max(600);
        grants.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let granted = lease
                .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                .await?
                .into_inner();
            Ok::<_, tonic::Status>((node, granted.id))
        });
    }
    while let Some(done) = tokio::time::timeout(args.phase_timeout, grants.join_next())
        .await
        .context("lease grants timed out")?
    {
        let (node, id) = done??;
        leases[node] = id;
    }
    let granted = started.elapsed();
    let started = Instant::now();
    let mut puts = JoinSet::new();
    for (node, &lease) in leases.iter().enumerate() {
        for instance in 0..args.instances {
            let mut kv = pb::kv_client::KvClient::new(channel(node * args.instances + instance));
            let limit = limit.clone();
            // Ten services per node, as plugins spread over a few names.
            let request = pb::PutRequest {
                key: key(instance % 10, node, instance),
                value: value(node, instance),
                lease,
                prev_kv: false,
            };
            puts.spawn(async move {
                let _permit = limit.acquire_owned().await;
                kv.put(request).await.map(drop)
            });
        }
    }
    let deadline = Instant::now() + args.phase_timeout;
    while let Some(done) = tokio::time::timeout_at(deadline.into(), puts.join_next())
        .await
        .context("puts timed out")?
    {
        done??;
    }
    let put = started.elapsed();
    println!(
        "registration: {} leases in {granted:.2?} ({}), {keys} keys in {put:.2?} ({})",
        args.nodes,
        rate(args.nodes, granted),
        rate(keys, put)
    );

    // 2. Keep-alive: one stream per node, `rounds` keep-alives each, as fast as etcd answers.
    let mut streams = JoinSet::new();
    let started = Instant::now();
    for (node, id) in leases.iter().copied().enumerate() {
        let mut lease = pb::lease_client::LeaseClient::new(channel(node));
        let rounds = args.rounds.max(1);
        streams.spawn(async move {
            let (tx, rx) = mpsc::channel(2);
            tx.send(pb::LeaseKeepAliveRequest { id }).await.ok();
            let requests = ReceiverStream::new(rx);
            let mut answers = lease.lease_keep_alive(requests).await?.into_inner();
            for round in 0..rounds {
                let answer = answers.message().await?;
                if answer.is_none_or(|a| a.ttl <= 0) {
                    return Err(tonic::Status::not_found("lease lost"));
                }
                if round + 1 < rounds {
                    tx.send(pb::LeaseKeepAliveRequest { id }).await.ok();
                }
            }
            Ok::<_, tonic::Status>(rounds)
        });
    }
    let mut answered = 0;
    let deadline = Instant::now() + args.phase_timeout;
    while let Some(done) = tokio::time::timeout_at(deadline.into(), streams.join_next())
        .await
        .context("keep-alives timed out")?
    {
        answered += done??;
    }
    let took = started.elapsed();
    let needed = args.nodes as f64 / (args.ttl as f64 / 3.0);
    println!(
        "keep-alive: {answered} answered in {took:.2?} ({}, streams opened included); \
         the nodes need {needed:.0}/s",
        rate(answered, took)
    );

    // 3. A full list, paged as the backend pages it.
    let started = Instant::now();
    let mut kv = pb::kv_client::KvClient::new(channel(0)).max_decoding_message_size(64 << 20);
    let (mut from, end, mut revision, mut listed, mut bytes) =
        (PREFIX.as_bytes().to_vec(), prefix_end(), 0, 0usize, 0usize);
    loop {
        let page = kv
            .range(pb::RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: 5000,
                revision,
                ..Default::default()
            })
            .await?
            .into_inner();
        if revision == 0 {
            revision = page.header.map_or(0, |h| h.revision);
        }
        listed += page.kvs.len();
        bytes += page
            .kvs
            .iter()
            .map(|kv| kv.key.len() + kv.value.len())
            .sum::<usize>();
        match page.kvs.last() {
            Some(last) if page.more => {
                from = last.key.clone();
                from.push(0);
            }
            _ => break,
        }
    }
    println!(
        "full list: {listed} keys, {:.1} MiB of keys and values, in {:.2?}",
        bytes as f64 / (1 << 20) as f64,
        started.elapsed()
    );

    // 4. Watch fan-out.
    let watchers = args.watchers.max(1);
    let churn = args.churn.max(1);
    let mut watching = JoinSet::new();
    let (ready_tx, mut ready_rx) = mpsc::channel(watchers);
    for w in 0..watchers {
        let mut watch = pb::watch_client::WatchClient::new(channel(w));
        let ready = ready_tx.clone();
        watching.spawn(async move {
            let (tx, rx) = mpsc::channel(1);
            let create = pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: PREFIX.as_bytes().to_vec(),
                        range_end: prefix_end(),
                        ..Default::default()
                    },
                )),
            };
            tx.send(create).await.ok();
            let requests = ReceiverStream::new(rx);
            let mut events = watch.watch(requests).await?.into_inner();
            let mut seen = 0;
            let _keep = tx;
            while seen < churn {
                let Some(response) = events.message().await? else {
                    return Err(tonic::Status::unavailable("watch ended"));
                };
                if response.created {
                    ready.send(()).await.ok();
                }
                seen += response.events.len();
            }
            Ok::<_, tonic::Status>(Instant::now())
        });
    }
    for _ in 0..watchers {
        tokio::time::timeout(args.phase_timeout, ready_rx.recv())
            .await
            .context("watches not created in time")?;
    }
    let started = Instant::now();
    let mut puts = JoinSet::new();
    for i in 0..churn {
        let mut kv = pb::kv_client::KvClient::new(channel(i));
        let limit = limit.clone();
        let node = i % args.nodes.max(1);
        let request = pb::PutRequest {
            key: key(i % 10, node, i % args.instances.max(1)),
            value: value(node, i),
            lease: leases.get(node).copied().unwrap_or_default(),
            prev_kv: false,
        };
        puts.spawn(async move {
            let _permit = limit.acquire_owned().await;
            kv.put(request).await.map(drop)
        });
    }
    while let Some(done) = puts.join_next().await {
        done??;
    }
    let put_time = started.elapsed();
    let mut last = started;
    let deadline = Instant::now() + args.phase_timeout;
    while let Some(done) = tokio::time::timeout_at(deadline.into(), watching.join_next())
        .await
        .context("watchers did not see every put in time")?
    {
        last = last.max(done??);
    }
    let fanned = last - started;
    println!(
        "watch fan-out: {churn} puts in {put_time:.2?} ({}) to {watchers} watchers: \
         {} events delivered in {fanned:.2?} ({})",
        rate(churn, put_time),
        churn * watchers,
        rate(churn * watchers, fanned)
    );
    Ok(())
}
