//! Script calls (`EVALSHA`) sent as one pipeline, reloading scripts that
//! missed Redis' script cache.

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, Value};

use crate::bus::redis::scripts::{is_noscript, Script};

/// One script call: the script, its keys, its arguments.
pub type Call = (&'static Script, Vec<String>, Vec<Value>);

/// `EVALSHA` as a custom command: fred's pipelines have no Lua interface.
/// In a cluster it is routed by its first key (argument 2).
fn evalsha() -> CustomCommand {
    CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false)
}

fn evalsha_args(script: &Script, keys: &[String], args: &[Value]) -> Vec<Value> {
    let mut v = Vec::with_capacity(2 + keys.len() + args.len());
    v.push(Value::from(script.sha.as_str()));
    v.push(Value::from(keys.len() as i64));
    v.extend(keys.iter().map(|k| Value::from(k.as_str())));
    v.extend(args.iter().cloned());
    v
}

/// Sends script calls as one pipeline and returns one result per call, in
/// order. Calls that missed the script cache are loaded and re-sent, in
/// order.
pub async fn run_pipelined(cmd: &Client, calls: Vec<Call>) -> Vec<Result<Value, Error>> {
    let n = calls.len();
    if n == 0 {
        return Vec::new();
    }
    let pipeline = cmd.pipeline();
    for (script, keys, args) in &calls {
        let queued: Result<Value, Error> = pipeline
            .custom(evalsha(), evalsha_args(script, keys, args))
            .await;
        if let Err(e) = queued {
            return (0..n).map(|_| Err(e.clone())).collect();
        }
    }
    let mut results: Vec<Result<Value, Error>> = pipeline.try_all::<Value>().await;
    if results.len() != n {
        // The whole pipeline failed (timeout, connection): one error.
        let e = results
            .pop()
            .and_then(Result::err)
            .unwrap_or_else(|| Error::new(ErrorKind::Unknown, "pipeline lost its replies"));
        return (0..n).map(|_| Err(e.clone())).collect();
    }
    let missed: Vec<usize> = (0..n)
        .filter(|&i| matches!(&results[i], Err(e) if is_noscript(e)))
        .collect();
    if !missed.is_empty() {
        let mut loaded: Vec<&str> = Vec::new();
        for &i in &missed {
            let script = calls[i].0;
            if loaded.contains(&script.sha.as_str()) {
                continue;
            }
            loaded.push(script.sha.as_str());
            if let Err(e) = cmd.script_load::<Value, _>(script.source.as_str()).await {
                for &i in &missed {
                    results[i] = Err(e.clone());
                }
                return results;
            }
        }
        let again = cmd.pipeline();
        for &i in &missed {
            let (script, keys, args) = &calls[i];
            let _: Result<Value, Error> = again
                .custom(evalsha(), evalsha_args(script, keys, args))
                .await;
        }
        let retried = again.try_all::<Value>().await;
        if retried.len() == missed.len() {
            for (&i, r) in missed.iter().zip(retried) {
                results[i] = r;
            }
        } else {
            let e = retried
                .into_iter()
                .next()
                .and_then(Result::err)
                .unwrap_or_else(|| Error::new(ErrorKind::Unknown, "pipeline lost its replies"));
            for &i in &missed {
                results[i] = Err(e.clone());
            }
        }
    }
    results
}
