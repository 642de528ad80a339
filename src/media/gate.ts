/**
 * Test instrumentation shared by the in-memory media and backing devices: injected I/O errors,
 * and holds that park matching I/O until the test releases it, so a test can force the
 * interleavings an event loop produces with real asynchronous I/O.
 */

export type IoOp = 'read' | 'write' | 'flush';

/** Decides whether an I/O is affected. A flush (or sync) is reported as offset 0, length 0. */
export type IoPredicate = (offset: number, length: number) => boolean;

export interface HoldController {
  /** How many I/Os are parked on this hold right now. */
  readonly parked: number;
  /** Resolves once at least `count` I/Os are parked, so a test knows its interleaving is set up. */
  waitParked(count?: number): Promise<void>;
  /** Lets every parked I/O proceed and ends the hold: later I/O is no longer parked. */
  release(): void;
}

class Hold implements HoldController {
  private waiting: Array<() => void> = [];
  private watchers: Array<{ count: number; resolve: () => void }> = [];
  active = true;

  constructor(
    private readonly pred: IoPredicate,
    private readonly ops: readonly IoOp[],
  ) {}

  matches(op: IoOp, offset: number, length: number): boolean {
    return this.active && this.ops.includes(op) && this.pred(offset, length);
  }

  park(): Promise<void> {
    return new Promise((resolve) => {
      this.waiting.push(resolve);
      this.watchers = this.watchers.filter((w) => {
        if (this.waiting.length < w.count) return true;
        w.resolve();
        return false;
      });
    });
  }

  get parked(): number {
    return this.waiting.length;
  }

  waitParked(count = 1): Promise<void> {
    if (this.waiting.length >= count) return Promise.resolve();
    return new Promise((resolve) => this.watchers.push({ count, resolve }));
  }

  release(): void {
    this.active = false;
    const waiting = this.waiting;
    this.waiting = [];
    for (const resume of waiting) resume();
  }
}

/** An error shaped like the one Node gives for a failed system call, so callers handle both alike. */
export function ioError(label: string, op: IoOp, offset: number, length: number): Error {
  const what = op === 'flush' ? 'flush' : `${op} of ${length} bytes at ${offset}`;
  return Object.assign(new Error(`EIO: i/o error, ${label}: ${what} (injected)`), {
    code: 'EIO',
    errno: -5,
  });
}

/** Completes on a later turn of the event loop, as real I/O does, so in-memory devices do not hide races. */
export function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export class Gate {
  private readFault: IoPredicate | null = null;
  private writeFault: IoPredicate | null = null;
  private flushFault = false;
  private holds: Hold[] = [];

  constructor(private readonly label: string) {}

  /** Reads for which `pred` holds reject with EIO; null stops injecting. */
  failReads(pred: IoPredicate | null): void {
    this.readFault = pred;
  }

  /** Writes for which `pred` holds reject with EIO and change nothing; null stops injecting. */
  failWrites(pred: IoPredicate | null): void {
    this.writeFault = pred;
  }

  /** While on, every flush rejects with EIO and makes nothing durable. */
  failFlushes(on: boolean): void {
    this.flushFault = on;
  }

  /** Parks every I/O of the given kinds for which `pred` holds, until `release()`. */
  hold(pred: IoPredicate, ops: readonly IoOp[] = ['read', 'write']): HoldController {
    const hold = new Hold(pred, ops);
    this.holds.push(hold);
    return hold;
  }

  /**
   * Every I/O passes here before it takes effect. Faults are judged after any hold, so that a
   * test can park an I/O, arm a fault, and release it into the fault.
   */
  async pass(op: IoOp, offset: number, length: number): Promise<void> {
    await settle();
    for (;;) {
      const hold = this.holds.find((h) => h.matches(op, offset, length));
      if (!hold) break;
      await hold.park();
    }
    this.holds = this.holds.filter((h) => h.active);
    const failing =
      op === 'read'
        ? this.readFault?.(offset, length)
        : op === 'write'
          ? this.writeFault?.(offset, length)
          : this.flushFault;
    if (failing) throw ioError(this.label, op, offset, length);
  }
}

/**
 * The fault and hold controls of a test device whose I/O passes through a Gate: the crash media
 * and the memory backing device share them.
 */
export abstract class GatedDevice {
  readonly gate: Gate;

  constructor(label: string) {
    this.gate = new Gate(label);
  }

  /** While set, matching reads reject with EIO. */
  failReads(pred: IoPredicate | null): void {
    this.gate.failReads(pred);
  }

  /** While set, matching writes reject with EIO and change nothing. */
  failWrites(pred: IoPredicate | null): void {
    this.gate.failWrites(pred);
  }

  /** Parks matching I/O until release(); a sync or flush is op 'flush' with offset 0, length 0. */
  hold(pred: IoPredicate, ops?: readonly IoOp[]): HoldController {
    return this.gate.hold(pred, ops);
  }
}
