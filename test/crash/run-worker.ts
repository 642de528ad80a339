import { Worker } from 'node:worker_threads';

/** Run test/crash/worker.ts with tsx's loader; rejects with the job's failure or after `timeoutMs`. */
export function runInWorker<T>(job: unknown, timeoutMs: number): Promise<T> {
  const tsx = import.meta.resolve('tsx/esm/api');
  const entry = new URL('./worker.ts', import.meta.url).href;
  const code = `const { register } = await import(${JSON.stringify(tsx)}); register(); await import(${JSON.stringify(entry)});`;
  const worker = new Worker(code, { eval: true, workerData: job });
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => {
      void worker.terminate();
      reject(new Error(`worker did not finish within ${timeoutMs} ms (a hang?)`));
    }, timeoutMs);
    worker.once('message', (msg: { ok: true; result: T } | { ok: false; error: string }) => {
      clearTimeout(timer);
      // The engines of abandoned caches may leave timers behind: the worker's job is done.
      void worker.terminate();
      if (msg.ok) resolve(msg.result);
      else reject(new Error(msg.error));
    });
    worker.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    worker.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`worker exited with ${code} before reporting`));
    });
  });
}
