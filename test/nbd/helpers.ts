import { spawn } from 'node:child_process';
import net from 'node:net';
import { ByteQueue } from '../../src/nbd/protocol.js';
import { createNbdServer, type NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';
import { MemoryDevice } from './memory-device.js';

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs a program without blocking the event loop: the server under test lives in this process,
 * so a synchronous spawn would deadlock it.
 */
export function run(
  cmd: string,
  args: string[],
  opts: { timeoutMs?: number; input?: string; env?: NodeJS.ProcessEnv } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: opts.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 30_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    child.stdin.on('error', () => {});
    child.stdin.end(opts.input ?? '');
  });
}

const toolCache = new Map<string, boolean>();

export async function haveTool(name: string): Promise<boolean> {
  let ok = toolCache.get(name);
  if (ok === undefined) {
    ok = (await run('which', [name]).catch(() => null))?.code === 0;
    toolCache.set(name, ok);
  }
  return ok;
}

/** Skips the test (saying why) when a tool is missing; true when all are there. */
export async function needTools(t: { skip(message?: string): void }, ...tools: string[]): Promise<boolean> {
  for (const tool of tools) {
    if (!(await haveTool(tool))) {
      t.skip(`${tool} is not installed`);
      return false;
    }
  }
  return true;
}

/**
 * python3-libnbd installs into the system Python; a python3 earlier on PATH (pyenv) cannot
 * import it, which also breaks the nbdsh wrapper. So scripts run with /usr/bin/python3.
 */
export const SYSTEM_PYTHON = '/usr/bin/python3';

export async function havePythonNbd(): Promise<boolean> {
  const key = 'python3-libnbd';
  let ok = toolCache.get(key);
  if (ok === undefined) {
    ok = (await run(SYSTEM_PYTHON, ['-c', 'import nbd']).catch(() => null))?.code === 0;
    toolCache.set(key, ok);
  }
  return ok;
}

/** Runs a python script with libnbd; the URI is in sys.argv[1]. */
export function runPython(script: string, args: string[], timeoutMs = 30_000): Promise<RunResult> {
  return run(SYSTEM_PYTHON, ['-c', script, ...args], { timeoutMs });
}

export interface TestServer {
  server: NbdServer;
  device: MemoryDevice;
  port: number;
  uri: string;
  logs: string[];
  close(): Promise<void>;
}

export async function startServer(
  size: number,
  opts: Partial<NbdServerOptions> = {},
  device = new MemoryDevice(size),
): Promise<TestServer> {
  const logs: string[] = [];
  const server = createNbdServer({ device, log: (m) => logs.push(m), ...opts });
  const { port } = await server.listenTcp('127.0.0.1', 0);
  const name = opts.exportName ?? '';
  return {
    server,
    device,
    port,
    uri: `nbd://127.0.0.1:${port}/${name}`,
    logs,
    close: () => server.close({ force: true }),
  };
}

/** A bare socket with exact-length reads, for speaking (and breaking) the protocol by hand. */
export class RawConn {
  readonly socket: net.Socket;
  private readonly queue = new ByteQueue();
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private ended = false;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (d: Buffer) => {
      this.queue.push(d);
      this.wake();
    });
    socket.on('end', () => {
      this.ended = true;
      this.wake();
    });
    socket.on('error', () => {
      this.ended = true;
      this.wake();
    });
  }

  static connect(port: number): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port });
      s.once('connect', () => resolve(new RawConn(s)));
      s.once('error', reject);
    });
  }

  static connectUnix(path: string): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ path });
      s.once('connect', () => resolve(new RawConn(s)));
      s.once('error', reject);
    });
  }

  read(n: number, timeoutMs = 5000): Promise<Buffer> {
    if (this.queue.length >= n) return Promise.resolve(this.queue.take(n));
    if (this.ended) return Promise.reject(new Error(`connection ended with ${this.queue.length} of ${n} bytes`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(new Error(`timed out waiting for ${n} bytes`));
      }, timeoutMs);
      this.waiter = {
        n,
        resolve: (b) => {
          clearTimeout(timer);
          resolve(b);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  /** Resolves true when the server closes the connection within the time limit. */
  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), timeoutMs)));
    const ok = await Promise.race([this.closedOrEnded().then(() => true), timeout]);
    clearTimeout(timer);
    return ok;
  }

  destroy(): void {
    this.socket.destroy();
  }

  private closedOrEnded(): Promise<void> {
    if (this.ended) return Promise.resolve();
    return new Promise((resolve) => {
      this.socket.once('end', () => resolve());
      this.socket.once('close', () => resolve());
    });
  }

  private wake(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.queue.length >= w.n) {
      this.waiter = null;
      w.resolve(this.queue.take(w.n));
    } else if (this.ended) {
      this.waiter = null;
      w.reject(new Error(`connection ended with ${this.queue.length} of ${w.n} bytes`));
    }
  }
}
