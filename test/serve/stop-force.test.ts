import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'node:test';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, run } from '../nbd/helpers.js';

const MiB = 1024 * 1024;

test('stop --force ends promptly under load, and what was flushed stays', async (t) => {
  for (const tool of ['qemu-io', 'fio']) if (!(await haveTool(tool))) return t.skip(`${tool} is not installed`);
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 128 * MiB);
  let srv = await startServe(dir, cache, backing);
  try {
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 100M 8M', '-c', 'flush', srv.uri]);
    assert.equal(w.code, 0, w.stderr);
    // Load from another client that keeps going until the server goes away.
    const fio = spawn(
      'fio',
      ['--name=load', '--ioengine=nbd', `--uri=${srv.uri}`, '--rw=randwrite', '--bs=64k', '--iodepth=32', '--size=64m', '--time_based', '--runtime=60', '--verify_state_save=0'],
      { stdio: 'ignore' },
    );
    await new Promise((r) => setTimeout(r, 1500));
    const t0 = Date.now();
    assert.equal(await srv.stop(true), 0);
    const took = Date.now() - t0;
    fio.kill('SIGKILL');
    assert.ok(took < 10_000, `stop --force took ${took} ms`);
    srv = await startServe(dir, cache, backing);
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 100M 8M', srv.uri]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.doesNotMatch(r.stdout, /Pattern verification failed/);
  } finally {
    if (srv.proc.exitCode === null && srv.proc.signalCode === null) await srv.stop().catch(() => srv.kill());
  }
});
