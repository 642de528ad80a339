/**
 * `pcache flush` progress and --timeout: periodic lines on a non-terminal stderr, the last
 * write-back error while the backing fails every write (nbdkit error filter), and a clear,
 * non-zero give-up after --timeout.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { runPcache } from '../helpers/cli.js';
import { startNbdkit } from '../helpers/nbd-servers.js';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, run } from '../nbd/helpers.js';

const MiB = 1024 * 1024;

test('flush shows progress lines, and with a failing backing gives up after --timeout naming the write-back error', async (t) => {
  for (const tool of ['nbdkit', 'nbdcopy']) if (!(await haveTool(tool))) return t.skip(`${tool} is not installed`);
  const dir = await tempDir();
  const disk = await sparseFile(join(dir, 'disk.img'), 32 * MiB);
  const data = join(dir, 'data.bin');
  await writeFile(data, randomBytes(8 * MiB));

  // A backing that works, slowed so that data is still dirty when `pcache flush` starts (a loaded
  // machine may take seconds to start the CLI), and the flush has something to report.
  const slow = await startNbdkit(dir, ['--filter=delay', 'file', disk, 'delay-write=3'], 'slow');
  t.after(() => slow.stop());
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const srv = await startServe(dir, cache, slow.uri);
  try {
    const w = await run('nbdcopy', [data, srv.uri]);
    assert.equal(w.code, 0, w.stderr);
    const fl = await runPcache(['flush', cache], { timeoutMs: 120_000 });
    assert.equal(fl.code, 0, fl.stderr);
    assert.match(fl.stderr, /^pcache: flush: 100% {2}[\d.]+ MiB of [\d.]+ MiB, [\d.]+ MiB\/s, \d+ s$/m);
    assert.doesNotMatch(fl.stderr, /\r|\x1b/, 'no terminal control on a pipe');
  } finally {
    await srv.stop();
  }

  // A backing that fails every write: the flush cannot finish.
  const failing = await startNbdkit(dir, ['--filter=error', 'file', disk, 'error-pwrite=EIO', 'error-pwrite-rate=100%'], 'failing');
  t.after(() => failing.stop());
  const cache2 = await sparseFile(join(dir, 'cache2.img'), 512 * MiB);
  const srv2 = await startServe(dir, cache2, failing.uri);
  try {
    const w = await run('nbdcopy', [data, srv2.uri]);
    assert.equal(w.code, 0, w.stderr);
    const started = Date.now();
    const fl = await runPcache(['flush', cache2, '--timeout', '4'], { timeoutMs: 60_000 });
    const took = Date.now() - started;
    assert.equal(fl.code, 1, fl.stderr);
    assert.match(fl.stderr, /^pcache: flush did not finish within 4 s: [\d.]+ MiB still dirty; last write-back error: .+; the server goes on writing back$/m);
    assert.match(fl.stderr, /^pcache: flush: .*write-back failing: /m, 'the progress line shows the error while waiting');
    assert.ok(took < 30_000, `gave up in ${took} ms`);
    // The server is still up and still holds the data.
    const st = await runPcache(['stats', cache2, '--json']);
    assert.equal(st.code, 0, st.stderr);
    assert.ok((JSON.parse(st.stdout) as { dirtyBytes: number }).dirtyBytes > 0);
  } finally {
    await srv2.stop(true);
  }

  const bad = await runPcache(['flush', cache2, '--timeout', 'soon']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--timeout must be an integer/);
});
