import type { Medium } from '../media/medium.js';

interface Pending {
  data: Buffer;
  at: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

/** The largest vectored write gathered from separate requests. */
const MAX_RUN = 1024 * 1024;
/** IOV_MAX on Linux: one writev takes at most this many buffers. */
const MAX_BUFFERS = 1024;

/**
 * Data writes to the cache device, gathered until the current microtasks have run. Requests that arrive
 * together (one socket read brings a whole queue of NBD writes) are allocated next to each other
 * at the data head, so they reach the cache device as one vectored write per contiguous run
 * instead of one system call each.
 *
 * Each write still resolves only once its own bytes are written (the key enters the index after
 * that, spec section 8), and a failed run fails every write in it.
 */
export class DataWriter {
  private queue: Pending[] = [];
  private scheduled = false;

  constructor(private readonly medium: Medium) {}

  write(data: Buffer, at: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ data, at, resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        // A microtask, not setImmediate: the requests of one socket read reach this point in the
        // same run of microtasks, and a lone request is not held back a turn of the event loop.
        queueMicrotask(() => this.issue());
      }
    });
  }

  private issue(): void {
    this.scheduled = false;
    const q = this.queue;
    this.queue = [];
    // Allocation order is usually device order already; sorting costs nothing then.
    q.sort((a, b) => a.at - b.at);
    let i = 0;
    while (i < q.length) {
      let end = q[i]!.at + q[i]!.data.length;
      let j = i + 1;
      while (j < q.length && q[j]!.at === end && end + q[j]!.data.length - q[i]!.at <= MAX_RUN && j - i < MAX_BUFFERS) {
        end += q[j]!.data.length;
        j++;
      }
      this.writeRun(q.slice(i, j));
      i = j;
    }
  }

  private writeRun(run: Pending[]): void {
    let p: Promise<void>;
    try {
      p = this.medium.write(run.length === 1 ? run[0]!.data : run.map((w) => w.data), run[0]!.at);
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      () => {
        for (const w of run) w.resolve();
      },
      (err: unknown) => {
        for (const w of run) w.reject(err);
      },
    );
  }
}
