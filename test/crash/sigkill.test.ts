/**
 * The SIGKILL loop (issue 6, item 3): the real `pcache serve` under a python/libnbd client load,
 * killed at a random moment, `pcache check` run on the cache file, restarted, read back whole and
 * verified; 20 times. Every write the client saw flushed (or FUA) reads back as itself or as a
 * later write; every sector reads as a value written to it or its initial zeros, never garbage or
 * another sector's data (each 512-byte sector carries its offset and write id, see tags.ts).
 *
 * PCACHE_SEED replays the random choices (the kill moments depend on timing).
 */
import assert from 'node:assert/strict';
import { access, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { runPcacheInProcess } from '../helpers/cli.js';
import { seededRng, testSeed } from '../helpers/rng.js';
import { sparseFile, startServe, type ServeProc } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { havePythonNbd, runPython } from '../nbd/helpers.js';
import { readSector, SECTOR } from './tags.js';

const MiB = 1024 * 1024;
const BACKING_SIZE = 16 * MiB;
const KILLS = Number(process.env.PCACHE_SIGKILLS ?? 20);
const SEED = testSeed('PCACHE_SEED');

/** Writes tagged sectors, flushing after most batches, and reports each step as it happens. */
const WRITER = `
import nbd, sys, struct, random
uri, seed, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lo, hi = int(sys.argv[4]), int(sys.argv[5])
h = nbd.NBD()
h.connect_uri(uri)
open(sys.argv[6], "w").close()
rnd = random.Random(seed)
wid = first
batch = 0
def say(s):
    sys.stdout.write(s + "\\n"); sys.stdout.flush()
try:
    while True:
        batch += 1
        for i in range(rnd.randint(1, 12)):
            sectors = rnd.choice([1, 1, 2, 8, 16, 64, 256])
            off = lo + rnd.randrange(0, (hi - lo) // 512 - sectors) * 512
            buf = b"".join(struct.pack("<IIQ", 0x31544350, wid, off + s * 512) * 32 for s in range(sectors))
            fua = rnd.random() < 0.1
            say("W %d %d %d" % (wid, off, sectors * 512))
            h.pwrite(buf, off, nbd.CMD_FLAG_FUA if fua else 0)
            say("A %d%s" % (wid, " F" if fua else ""))
            wid += 1
        if rnd.random() < 0.7:
            say("S %d" % batch)
            h.flush()
            say("D %d" % batch)
except nbd.Error as e:
    say("E %s" % e)
`;

/** Wait until every path exists (each writer creates its own once connected). */
async function waitForFiles(paths: string[], timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (const p of paths) {
    for (;;) {
      try {
        await access(p);
        break;
      } catch {
        if (Date.now() > until) throw new Error(`a writer did not connect within ${timeoutMs} ms (${p})`);
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }
}

const READER = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
with open(sys.argv[2], "wb") as f:
    for off in range(0, size, 4 << 20):
        f.write(h.pread(min(4 << 20, size - off), off))
print("OK")
`;

interface Write {
  off: number;
  len: number;
  acked: boolean;
  durable: boolean;
}

class ClientModel {
  readonly writes = new Map<number, Write>();
  /** Per sector: write ids in order since its last verified value (index 0: that value, 0 = zeros). */
  readonly hist = new Map<number, number[]>();
  /** Per sector: index in hist of the newest durable value. */
  readonly floor = new Map<number, number>();
  private ackedSinceFlush: number[] = [];
  private flushing = new Map<number, number[]>();
  nextId = 1;
  stats = { writes: 0, acked: 0, flushes: 0, fua: 0 };

  feed(out: string): void {
    for (const line of out.split('\n')) {
      const [k, a, b, c] = line.split(' ');
      if (k === 'W') {
        const id = Number(a);
        const w = { off: Number(b), len: Number(c), acked: false, durable: false };
        this.writes.set(id, w);
        this.stats.writes++;
        this.nextId = Math.max(this.nextId, id + 1);
        for (let s = w.off / SECTOR; s < (w.off + w.len) / SECTOR; s++) {
          let h = this.hist.get(s);
          if (!h) this.hist.set(s, (h = [0]));
          h.push(id);
        }
      } else if (k === 'A') {
        const id = Number(a);
        this.writes.get(id)!.acked = true;
        this.stats.acked++;
        if (b === 'F') {
          this.stats.fua++;
          this.durable(id);
        } else this.ackedSinceFlush.push(id);
      } else if (k === 'S') {
        this.flushing.set(Number(a), this.ackedSinceFlush);
        this.ackedSinceFlush = [];
      } else if (k === 'D') {
        this.stats.flushes++;
        for (const id of this.flushing.get(Number(a)) ?? []) this.durable(id);
      }
    }
    this.ackedSinceFlush = [];
    this.flushing.clear();
  }

  private durable(id: number): void {
    const w = this.writes.get(id)!;
    w.durable = true;
    for (let s = w.off / SECTOR; s < (w.off + w.len) / SECTOR; s++) {
      const i = this.hist.get(s)!.lastIndexOf(id);
      if (i > (this.floor.get(s) ?? 0)) this.floor.set(s, i);
    }
  }

  /** Check the whole device image read back after a restart, and pin what it holds. */
  verify(img: Buffer, round: number): number {
    let checked = 0;
    for (let s = 0; s < img.length / SECTOR; s++) {
      const v = readSector(img, s * SECTOR, s * SECTOR);
      const h = this.hist.get(s);
      if (!h) {
        assert.equal(v.kind, 'zero', `round ${round}: sector ${s} was never written, yet reads ${JSON.stringify(v)}`);
        continue;
      }
      checked++;
      const allowed = h.slice(this.floor.get(s) ?? 0);
      const id = v.kind === 'tag' ? v.id : v.kind === 'zero' ? 0 : -1;
      if (!allowed.includes(id)) {
        const what = (x: number): string => (x === 0 ? 'zeros' : `write ${x}${this.writes.get(x)?.durable ? ' (durable)' : this.writes.get(x)?.acked ? ' (acked)' : ''}`);
        assert.fail(`round ${round}: sector ${s} reads ${v.kind === 'garbage' ? `garbage (${v.why})` : what(id)}; allowed: ${allowed.map(what).join(', ')}`);
      }
      this.hist.set(s, [id]);
      this.floor.set(s, 0);
    }
    return checked;
  }
}

test(`SIGKILL loop: pcache serve under a libnbd client, killed ${KILLS} times; flushed data survives, check is clean (seed ${SEED})`, async (t) => {
  if (!(await havePythonNbd())) {
    console.log('SIGKILL loop skipped: /usr/bin/python3 cannot import nbd (Debian package python3-libnbd)');
    return t.skip('python3-libnbd is not installed');
  }
  const rng = seededRng(SEED);
  const dir = await tempDir('pcache-sigkill-');
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), BACKING_SIZE);
  const model = new ClientModel();
  let srv: ServeProc = await startServe(dir, cache, backing);
  let verified = 0;
  try {
    for (let round = 0; round < KILLS; round++) {
      // Two writers on the two halves of the device, so requests are in flight together.
      const writers = [0, 1].map((k) =>
        runPython(WRITER, [srv.uri, String(rng.int(2 ** 31)), String(model.nextId + k * 1_000_000), String((k * BACKING_SIZE) / 2), String(((k + 1) * BACKING_SIZE) / 2), join(dir, `ready-${round}-${k}`)], 60_000),
      );
      // The kill lands while both write: on a loaded machine python may take longer to start and
      // connect than the delay below, and a writer that never connected has nothing to check.
      await waitForFiles([0, 1].map((k) => join(dir, `ready-${round}-${k}`)), 30_000);
      await new Promise((r) => setTimeout(r, 300 + rng.int(1500)));
      await srv.kill('SIGKILL');
      const outs = await Promise.all(writers);
      for (const o of outs) {
        assert.match(o.stdout, /^E /m, `the writer ended with the server's death: ${o.stderr}`);
        model.feed(o.stdout);
      }
      model.nextId += 2_000_000;
      const check = await runPcacheInProcess(['check', cache, '--backing-size', String(BACKING_SIZE)]);
      assert.equal(check.code, 0, `round ${round}: pcache check: ${check.stdout}${check.stderr}`);
      srv = await startServe(dir, cache, backing);
      const out = join(dir, 'readback.img');
      const r = await runPython(READER, [srv.uri, out], 60_000);
      assert.equal(r.code, 0, r.stderr);
      verified += model.verify(await readFile(out), round);
    }
    // Finally: a clean stop, the backing device drained to what the device reads.
    const out = join(dir, 'final.img');
    assert.equal((await runPython(READER, [srv.uri, out], 60_000)).code, 0);
    const finalImage = await readFile(out);
    model.verify(finalImage, KILLS);
    const fl = await runPcacheInProcess(['flush', cache]);
    assert.equal(fl.code, 0, fl.stderr);
    await srv.stop();
    assert.ok((await readFile(backing)).equals(finalImage), 'after pcache flush the backing file equals the device');
    const check = await runPcacheInProcess(['check', cache]);
    assert.equal(check.code, 0, check.stdout);
  } finally {
    if (srv.proc.exitCode === null && srv.proc.signalCode === null) await srv.kill('SIGKILL');
  }
  t.diagnostic(
    `seed ${SEED}: ${KILLS} kills; ${model.stats.writes} writes issued, ${model.stats.acked} acked, ${model.stats.fua} FUA, ${model.stats.flushes} flushes completed; ${verified} written sectors verified`,
  );
  assert.ok(model.stats.flushes > KILLS, 'the clients saw flushes complete');
});
