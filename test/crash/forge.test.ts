/**
 * Forged and damaged cache devices (issue 6): 10,000 cases per run, each a valid engine-made image
 * damaged at random or with knowledge of its structure, then checked, dumped, opened, read,
 * written and drained. See forge.ts. PCACHE_FORGE_SEED replays a run, with PCACHE_FORGE_CASE one
 * case; PCACHE_FORGE_CASES changes the count.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { testSeed } from '../helpers/rng.js';
import type { ForgeFuzzResult } from './forge.js';
import { runInWorker } from './run-worker.js';

const SEED = testSeed('PCACHE_FORGE_SEED');
const CASES = Number(process.env.PCACHE_FORGE_CASES ?? 10_000);
const ONLY = process.env.PCACHE_FORGE_CASE !== undefined ? Number(process.env.PCACHE_FORGE_CASE) : undefined;
console.log(`forge fuzz seed ${SEED} (replay with PCACHE_FORGE_SEED=${SEED})`);

test(`forged caches: ${CASES} damaged images; check, dump, open, read, write and drain work or name the damage (seed ${SEED})`, async (t) => {
  const r = await runInWorker<ForgeFuzzResult>({ kind: 'forge', opts: { seed: SEED, cases: ONLY !== undefined ? ONLY + 1 : CASES, onlyCase: ONLY } }, 10 * 60_000);
  t.diagnostic(`seed ${SEED}: ${r.cases} cases in ${Math.round(r.ms / 1000)} s; check clean ${r.checkClean}, problems ${r.checkProblems}; opened ${r.opened}, refused ${r.refused}`);
  t.diagnostic(`reads ${r.reads} (${r.readErrors} errors), writes ${r.writes} (${r.writeErrors}), drains ${r.drains} (${r.drainErrors})`);
  t.diagnostic(`mutations: ${JSON.stringify(r.mutations)}`);
  t.diagnostic(`bases: ${r.bases.join(' | ')}`);
  if (ONLY !== undefined) return;
  assert.equal(r.cases, CASES);
  // Both outcomes, and many different refusals: the damage reached many checks, not only the first crc.
  assert.ok(r.opened > CASES / 10 && r.refused > CASES / 10, `opened ${r.opened}, refused ${r.refused}`);
  assert.ok(Object.keys(r.refusals).length >= 15, Object.keys(r.refusals).join('\n'));
  assert.ok(r.checkProblems > 0 && r.checkClean > 0);
});
