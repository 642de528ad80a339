/**
 * Real NBD servers for backing-device tests: nbdkit and qemu-nbd on unix sockets, started in the
 * foreground so a test can SIGKILL and restart them on the same socket path.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';

export interface ServerProc {
  sock: string;
  uri: string;
  stderr(): string;
  /** Kill (SIGKILL by default) and wait for the exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Start it again with the same arguments on the same socket (after kill). */
  restart(): Promise<void>;
  /** SIGTERM and wait; idempotent. */
  stop(): Promise<void>;
}

interface Running {
  child: ChildProcess;
  exited: Promise<void>;
  stderr: string;
}

async function launch(cmd: string, args: string[], pidFile: string, sock: string): Promise<Running> {
  // A SIGKILLed server leaves its socket and pid file behind; nbdkit refuses an existing socket.
  rmSync(sock, { force: true });
  rmSync(pidFile, { force: true });
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const r: Running = { child, exited: new Promise((resolve) => child.once('exit', () => resolve())), stderr: '' };
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (r.stderr += d));
  child.once('error', (e) => (r.stderr += String(e)));
  // Both servers write the pid file once they listen; the socket appears a moment earlier.
  for (let i = 0; !existsSync(pidFile); i++) {
    if (i > 400 || child.exitCode !== null || child.signalCode !== null) {
      child.kill('SIGKILL');
      throw new Error(`${cmd} did not start: ${r.stderr}`);
    }
    await new Promise((res) => setTimeout(res, 25));
  }
  return r;
}

function managed(cmd: string, argsFor: (pidFile: string) => string[], dir: string, name: string): Promise<ServerProc> {
  const sock = join(dir, `${name}.sock`);
  const pidFile = join(dir, `${name}.pid`);
  const args = argsFor(pidFile);
  let cur: Running | null = null;
  let log = '';
  const proc: ServerProc = {
    sock,
    uri: `nbd+unix:///?socket=${sock}`,
    stderr: () => log + (cur?.stderr ?? ''),
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      const r = cur;
      if (!r) return;
      cur = null;
      log += r.stderr;
      r.child.kill(signal);
      await r.exited;
    },
    async restart() {
      if (cur) throw new Error(`${cmd} is still running`);
      cur = await launch(cmd, args, pidFile, sock);
    },
    async stop() {
      await proc.kill('SIGTERM');
    },
  };
  return proc.restart().then(() => proc);
}

/** `nbdkit [filters] PLUGIN args...` on a unix socket in `dir`. */
export function startNbdkit(dir: string, pluginArgs: string[], name = 'nbdkit'): Promise<ServerProc> {
  return managed('nbdkit', (pid) => ['-f', '--exit-with-parent', '-P', pid, '-U', join(dir, `${name}.sock`), ...pluginArgs], dir, name);
}

/** `qemu-nbd -f raw` of `file` on a unix socket in `dir`, persistent (it outlives its clients). */
export function startQemuNbd(dir: string, file: string, name = 'qemu-nbd'): Promise<ServerProc> {
  return managed('qemu-nbd', (pid) => ['-f', 'raw', '-t', '--pid-file', pid, '-k', join(dir, `${name}.sock`), '--cache=writeback', file], dir, name);
}
