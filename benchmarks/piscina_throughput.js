// piscina's throughput for trivial tasks, measured the way benchmarks/scenarios.py measures
// the Python systems: INFLIGHT submitters, each with one task outstanding, until TASKS tasks
// have run or BUDGET seconds have passed. Prints one JSON line.
//
//   node benchmarks/piscina_throughput.js NODE_MODULES THREADS TASKS INFLIGHT BUDGET
//
// NODE_MODULES is the directory piscina was installed into (benchmarks/_external.py keeps it
// in a cache outside the repository). The task (benchmarks/piscina_worker.js) returns its
// argument, as benchmarks/_tasks.py's echo does.
'use strict';

const path = require('node:path');
const { performance } = require('node:perf_hooks');

const [modules, threads, tasks, inflight, budget] = process.argv.slice(2);
const { Piscina } = require(path.join(modules, 'piscina'));
const version = require(path.join(modules, 'piscina', 'package.json')).version;

async function main() {
  const pool = new Piscina({
    filename: path.join(__dirname, 'piscina_worker.js'),
    minThreads: Number(threads),
    maxThreads: Number(threads),
    idleTimeout: 60_000,
  });
  // Steady state first: both threads started and the task module loaded.
  await Promise.all(Array.from({ length: 64 }, (_, i) => pool.run(i)));

  let remaining = Number(tasks);
  let done = 0;
  const stopAt = performance.now() + Number(budget) * 1000;
  async function submitter() {
    while (remaining > 0 && performance.now() < stopAt) {
      remaining -= 1;
      const x = remaining;
      if ((await pool.run(x)) !== x) throw new Error(`echo returned the wrong value for ${x}`);
      done += 1;
    }
  }
  const t0 = performance.now();
  await Promise.all(Array.from({ length: Number(inflight) }, submitter));
  const seconds = (performance.now() - t0) / 1000;
  const used = pool.threads.length;
  await pool.destroy();
  console.log(JSON.stringify({
    tasks: done, seconds, tasks_per_s: done / seconds, threads: used, piscina: version,
    node: process.version,
  }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
