import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { runPcache } from '../helpers/cli.js';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, run } from '../nbd/helpers.js';

const MiB = 1024 * 1024;

async function sh(cmd: string, args: string[], timeoutMs = 120_000): Promise<string> {
  const r = await run(cmd, args, { timeoutMs });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** nbdfuse exposes the export as a file, a loop device makes it a block device, ext4 goes on top. */
class Stack {
  private fuse: ChildProcess | null = null;
  loop = '';
  constructor(
    private readonly dir: string,
    private readonly uri: string,
  ) {}

  async attach(): Promise<string> {
    const fuseDir = join(this.dir, 'fuse');
    await mkdir(fuseDir, { recursive: true });
    const pidfile = join(this.dir, `nbdfuse-${Date.now()}.pid`);
    this.fuse = spawn('nbdfuse', ['-P', pidfile, fuseDir, this.uri], { stdio: 'ignore' });
    for (let i = 0; i < 200 && !existsSync(pidfile); i++) await new Promise((r) => setTimeout(r, 50));
    assert.ok(existsSync(pidfile), 'nbdfuse did not start');
    this.loop = (await sh('losetup', ['-f', '--show', join(fuseDir, 'nbd')])).trim();
    return this.loop;
  }

  async mount(): Promise<string> {
    const mnt = join(this.dir, 'mnt');
    await mkdir(mnt, { recursive: true });
    await sh('mount', ['-t', 'ext4', this.loop, mnt]);
    return mnt;
  }

  async detach(opts: { lazy?: boolean } = {}): Promise<void> {
    const mnt = join(this.dir, 'mnt');
    await run('umount', opts.lazy ? ['-l', mnt] : [mnt]);
    if (this.loop) await run('losetup', ['-d', this.loop]);
    this.loop = '';
    await run('fusermount3', ['-u', ...(opts.lazy ? ['-z'] : []), join(this.dir, 'fuse')]);
    if (this.fuse && this.fuse.exitCode === null && this.fuse.signalCode === null) {
      const exited = new Promise((r) => this.fuse!.once('exit', r));
      setTimeout(() => this.fuse?.kill('SIGKILL'), 10_000).unref();
      await exited;
    }
    this.fuse = null;
  }
}

async function writeFiles(dir: string, n: number, tag: string): Promise<Map<string, string>> {
  const sums = new Map<string, string>();
  for (let i = 0; i < n; i++) {
    const data = randomBytes(64 * 1024 + i * 37 * 1024);
    const name = `${tag}-${i}.bin`;
    await writeFile(join(dir, name), data);
    sums.set(name, createHash('sha256').update(data).digest('hex'));
  }
  return sums;
}

async function verifyFiles(dir: string, sums: Map<string, string>): Promise<void> {
  for (const [name, sum] of sums) {
    const data = await readFile(join(dir, name));
    assert.equal(createHash('sha256').update(data).digest('hex'), sum, name);
  }
}

test('ext4 on nbdfuse + loop: survives restart, SIGKILL after sync, and drains to a clean backing', async (t) => {
  for (const tool of ['nbdfuse', 'losetup', 'mkfs.ext4', 'e2fsck', 'fusermount3']) {
    if (!(await haveTool(tool))) return t.skip(`${tool} is not installed`);
  }
  if (process.getuid?.() !== 0) return t.skip('mount and losetup need root');
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const backing = await sparseFile(join(dir, 'backing.img'), 256 * MiB);
  let srv = await startServe(dir, cache, backing);
  let stack = new Stack(dir, srv.uri);
  try {
    const dev = await stack.attach();
    await sh('mkfs.ext4', ['-q', '-F', dev]);
    let mnt = await stack.mount();
    const first = await writeFiles(mnt, 24, 'a');
    await stack.detach();
    assert.equal(await srv.stop(), 0);

    // A clean restart keeps everything.
    srv = await startServe(dir, cache, backing);
    stack = new Stack(dir, srv.uri);
    await sh('e2fsck', ['-fn', await stack.attach()]);
    mnt = await stack.mount();
    await verifyFiles(mnt, first);
    const second = await writeFiles(mnt, 16, 'b');
    await sh('sync', []);
    // SIGKILL right after sync returned: all of it was flushed.
    await srv.kill('SIGKILL');
    await stack.detach({ lazy: true });

    srv = await startServe(dir, cache, backing);
    stack = new Stack(dir, srv.uri);
    await stack.attach();
    mnt = await stack.mount();
    await verifyFiles(mnt, first);
    await verifyFiles(mnt, second);
    assert.equal((await readdir(mnt)).filter((n) => n.endsWith('.bin')).length, first.size + second.size);
    await stack.detach();
    stack = new Stack(dir, srv.uri);
    await sh('e2fsck', ['-fn', await stack.attach()]);
    await stack.detach();

    // After pcache flush the backing file alone is the filesystem.
    const fl = await runPcache(['flush', cache], { timeoutMs: 120_000 });
    assert.equal(fl.code, 0, fl.stderr);
    assert.equal(await srv.stop(), 0);
    await sh('e2fsck', ['-fn', backing]);
    const roMnt = join(dir, 'ro');
    await mkdir(roMnt);
    await sh('mount', ['-o', 'loop,ro,noload', backing, roMnt]);
    try {
      await verifyFiles(roMnt, first);
      await verifyFiles(roMnt, second);
    } finally {
      await run('umount', [roMnt]);
    }
  } finally {
    await stack.detach({ lazy: true }).catch(() => undefined);
    if (srv.proc.exitCode === null && srv.proc.signalCode === null) await srv.kill();
  }
});
