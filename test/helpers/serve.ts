/** A real `pcache serve` child process for tests, on a unix socket in a temp directory. */
import { spawn, type ChildProcess } from 'node:child_process';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { REPO_ROOT, runPcache } from './cli.js';

export interface ServeProc {
  proc: ChildProcess;
  uri: string;
  socket: string;
  statusLine: string;
  stderr(): string;
  /** Resolves with the exit code (or the signal) when the process ends. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** `pcache stop` and wait for the exit. */
  stop(force?: boolean): Promise<number | null>;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

export async function sparseFile(path: string, size: number): Promise<string> {
  const fh = await open(path, 'w');
  await fh.truncate(size);
  await fh.close();
  return path;
}

export async function startServe(
  dir: string,
  cacheDev: string,
  backingDev: string,
  tableOpts: string[] = [],
  extra: string[] = [],
  env: NodeJS.ProcessEnv = process.env,
): Promise<ServeProc> {
  const socket = join(dir, `nbd-${Math.random().toString(36).slice(2, 8)}.sock`);
  // Through bin/pcache.js, as a user starts it (it sizes libuv's thread pool before the pool exists).
  const proc = spawn(process.execPath, [join(REPO_ROOT, 'bin/pcache.js'), 'serve', cacheDev, backingDev, ...tableOpts, '--socket', socket, ...extra], {
    cwd: REPO_ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  proc.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const ready = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`pcache serve did not start: ${err}`)), 60_000);
    const check = (): void => {
      const line = out.split('\n').find((l) => l.includes(' pcache '));
      if (line) {
        clearTimeout(timer);
        resolve(line);
      }
    };
    proc.stdout!.on('data', check);
    void exited.then(({ code }) => {
      clearTimeout(timer);
      reject(new Error(`pcache serve exited (${code}) before it was ready: ${err}`));
    });
  });
  return {
    proc,
    uri: `nbd+unix:///?socket=${socket}`,
    socket,
    statusLine: ready,
    stderr: () => err,
    exited,
    async stop(force = false) {
      const r = await runPcache(['stop', cacheDev, ...(force ? ['--force'] : [])]);
      if (r.code !== 0) throw new Error(`pcache stop failed: ${r.stderr}`);
      return (await exited).code;
    },
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      proc.kill(signal);
      await exited;
    },
  };
}
