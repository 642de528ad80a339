/** Worker entry: run the fuzz with the seed and count from workerData, post the result or the failure. */
import { parentPort, workerData } from 'node:worker_threads';
import { runCheckFuzz } from './check-fuzz.js';

const { seed, flips } = workerData as { seed: number; flips: number };
try {
  parentPort!.postMessage({ ok: true, result: await runCheckFuzz(seed, flips) });
} catch (err) {
  parentPort!.postMessage({ ok: false, error: err instanceof Error ? err.message : String(err) });
}
