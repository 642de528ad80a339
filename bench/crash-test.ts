/**
 * The long-run crash test: `npm run crash-test -- --iterations N --seed S`.
 *
 * Runs N simulated power cuts (see test/crash/crash-driver.ts) and prints what was tried. On a
 * property violation it prints the failure with the seed and lineage that replay it, and exits 1.
 *
 *   --iterations N   crash points to run (default 2000)
 *   --seed S         seed (default: random, printed)
 *   --lineage L      run only lineage L of the seed (replaying a failure)
 *   --quiet          no progress lines
 */
import { CrashFailure, runCrashDriver } from '../test/crash/crash-driver.js';

function usage(msg: string): never {
  console.error(`crash-test: ${msg}\nusage: npm run crash-test -- [--iterations N] [--seed S] [--lineage L] [--quiet]`);
  process.exit(2);
}

const args = process.argv.slice(2);
let iterations = 2000;
let seed = Number(process.env.PCACHE_SEED ?? Math.floor(Math.random() * 2 ** 32)) >>> 0;
let lineage: number | undefined = process.env.PCACHE_LINEAGE !== undefined ? Number(process.env.PCACHE_LINEAGE) : undefined;
let quiet = false;
for (let i = 0; i < args.length; i++) {
  const a = args[i]!;
  const num = (): number => {
    const v = args[++i];
    if (v === undefined || !/^\d+$/.test(v)) usage(`${a} needs a non-negative integer`);
    return Number(v);
  };
  if (a === '--iterations') iterations = num();
  else if (a === '--seed') seed = num() >>> 0;
  else if (a === '--lineage') lineage = num();
  else if (a === '--quiet') quiet = true;
  else usage(`unknown argument ${a}`);
}

console.log(`crash-test: ${iterations} crash points, seed ${seed}${lineage !== undefined ? `, lineage ${lineage} only` : ''}`);
try {
  const r = await runCrashDriver({ seed, crashPoints: iterations, onlyLineage: lineage, log: quiet ? undefined : (l) => console.log(l) });
  console.log(JSON.stringify(r, null, 2));
  console.log(`crash-test: PASS: ${r.crashPoints} crash points in ${r.lineages} lineages, ${r.sectorsVerified} sectors verified, seed ${seed}`);
} catch (err) {
  if (err instanceof CrashFailure) console.error(`crash-test: FAIL: ${err.message}`);
  else console.error(`crash-test: ERROR (seed ${seed}):`, err);
  process.exitCode = 1;
}
// Engines abandoned at a crash may still hold timers: the run is over.
process.exit(process.exitCode ?? 0);
