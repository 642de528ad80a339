import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { KEY_SIZE, KSET_HEADER_SIZE, MiB } from '../../src/format/index.js';
import { fuzzRegions, type FuzzResult } from '../helpers/check-fuzz.js';
import { buildLoggedImage } from '../helpers/image.js';
import { SparseMedium } from '../helpers/media.js';
import { testSeed } from '../helpers/rng.js';

const FLIPS = 10_000;
const seed = testSeed('PCACHE_FUZZ_SEED');

/** Runs the fuzz in a worker thread with tsx's loader, away from the test runner's promise tracking. */
function fuzzInWorker(s: number, flips: number): Promise<FuzzResult> {
  const tsx = import.meta.resolve('tsx/esm/api');
  const entry = new URL('../helpers/check-fuzz-worker.ts', import.meta.url).href;
  const code = `const { register } = await import(${JSON.stringify(tsx)}); register(); await import(${JSON.stringify(entry)});`;
  const worker = new Worker(code, { eval: true, workerData: { seed: s, flips } });
  return new Promise((resolve, reject) => {
    worker.once('message', (msg: { ok: true; result: FuzzResult } | { ok: false; error: string }) => {
      if (msg.ok) resolve(msg.result);
      else reject(new Error(msg.error));
    });
    worker.once('error', reject);
    worker.once('exit', (code) => reject(new Error(`fuzz worker exited with ${code} before reporting`)));
  });
}

test(`fuzz: ${FLIPS} random byte flips; check never throws, hangs or reads out of bounds (seed ${seed})`, async (t) => {
  t.diagnostic(`seed ${seed} (replay with PCACHE_FUZZ_SEED=${seed})`);
  console.log(`check fuzz seed ${seed}`);
  const r = await fuzzInWorker(seed, FLIPS);
  t.diagnostic(`${r.flips} flips in ${r.ms} ms: ${r.clean} still clean, ${r.kinds.length} kinds of problem`);
  // The flips reached both outcomes and many different checks, not only the first crc.
  assert.ok(r.clean > 0 && r.clean < FLIPS);
  assert.ok(r.kinds.length >= 15, r.kinds.join('\n'));
});

test('fuzz setup: flips cover every kset, every key data range, and the log after the last kset', async () => {
  const img = await buildLoggedImage(new SparseMedium(512 * MiB));
  const { data, log, meta } = fuzzRegions(img);
  assert.equal(data.length, img.expect.keys);
  assert.equal(log.length, img.ksets.length + 1);
  for (const [i, k] of img.ksets.entries()) {
    assert.equal(log[i]!.offset, k.offset);
    assert.ok(log[i]!.length >= KSET_HEADER_SIZE && log[i]!.length <= KSET_HEADER_SIZE * 2 + KEY_SIZE * 3);
  }
  assert.equal(meta.length, 1 + 2 + 4 + 8 * 4);
});
