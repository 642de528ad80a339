/**
 * Runs a long randomized job in a worker thread: the test runner tracks every promise of the
 * thread that runs tests, which makes loops of millions of small promises several times slower.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { CrashFailure, runCrashDriver, type CrashDriverOptions } from './crash-driver.js';
import { runForgeFuzz, type ForgeFuzzOptions } from './forge.js';

type Job = { kind: 'crash'; opts: CrashDriverOptions } | { kind: 'forge'; opts: ForgeFuzzOptions };

const job = workerData as Job;
try {
  const result = job.kind === 'crash' ? await runCrashDriver(job.opts) : await runForgeFuzz(job.opts);
  parentPort!.postMessage({ ok: true, result });
} catch (err) {
  const msg = err instanceof CrashFailure ? err.message : err instanceof Error ? (err.stack ?? err.message) : String(err);
  parentPort!.postMessage({ ok: false, error: msg });
}
