/**
 * Simulated power cuts (issue 6): at least 2,000 crash points per run, in two worker threads that
 * share one seed (even and odd lineages). See crash-driver.ts for what is checked at each.
 *
 * The seed is printed; PCACHE_SEED replays a run, PCACHE_SEED with PCACHE_LINEAGE one lineage
 * (`npm run crash-test -- --seed S --lineage L`). PCACHE_CRASH_POINTS changes the count.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { testSeed } from '../helpers/rng.js';
import type { CrashDriverResult } from './crash-driver.js';
import { runInWorker } from './run-worker.js';

const SEED = testSeed('PCACHE_SEED');
const POINTS = Number(process.env.PCACHE_CRASH_POINTS ?? 2000);
const WORKERS = 2;
console.log(`crash test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

function merge(rs: CrashDriverResult[]): CrashDriverResult {
  const out = { ...rs[0]!, crashedAt: {} as Record<string, number>, events: {} as Record<string, number>, phaseMs: {} as Record<string, number> };
  for (const k of ['crashPoints', 'lineages', 'ops', 'writes', 'bytesWritten', 'flushes', 'sectorsVerified', 'drains', 'fullCompares', 'fallbacks', 'tornLogEnds', 'cleanRestarts', 'formatCuts'] as const) {
    out[k] = rs.reduce((n, r) => n + r[k], 0);
  }
  out.ms = Math.max(...rs.map((r) => r.ms));
  for (const r of rs) {
    for (const f of ['crashedAt', 'events', 'phaseMs'] as const) {
      for (const [k, v] of Object.entries(r[f])) out[f][k] = (out[f][k] ?? 0) + v;
    }
  }
  return out;
}

test(`crash driver: ${POINTS} power cuts under a random workload, reopened and verified (seed ${SEED})`, async (t) => {
  const rs = await Promise.all(
    Array.from({ length: WORKERS }, (_, k) =>
      runInWorker<CrashDriverResult>({ kind: 'crash', opts: { seed: SEED, crashPoints: Math.ceil(POINTS / WORKERS), stride: WORKERS, offset: k } }, 20 * 60_000),
    ),
  );
  const r = merge(rs);
  t.diagnostic(`seed ${SEED}: ${r.crashPoints} crash points in ${r.lineages} lineages, ${r.ops} requests, ${r.sectorsVerified} sectors verified, ${r.drains} drains, ${Math.round(r.ms / 1000)} s`);
  t.diagnostic(`cut at: ${JSON.stringify(r.crashedAt)}; ${r.cleanRestarts} clean restarts, ${r.formatCuts} cuts while formatting, ${r.tornLogEnds} torn log ends`);
  t.diagnostic(`moments seen: ${JSON.stringify(r.events)}`);
  assert.ok(r.crashPoints >= POINTS, `${r.crashPoints} crash points`);
  assert.equal(r.fullCompares, r.lineages, 'every lineage ended with a full compare of the drained backing device');
  if (POINTS >= 1000) {
    // The run reached every kind of moment it aims at, not only random ones.
    for (const k of ['time', 'kset', 'kset-trailer', 'log-end', 'last-kset', 'key-tail', 'dirty-tail', 'gen', 'reuse', 'wb-write', 'wb-write-merged', 'wb-read-ahead', 'wb-flush', 'data', 'sync']) {
      assert.ok((r.crashedAt[k] ?? 0) > 0, `no crash point at ${k}: ${JSON.stringify(r.crashedAt)}`);
    }
  }
});
