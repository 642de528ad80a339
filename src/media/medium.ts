/**
 * The cache device. One small interface so that the engine runs the same over a file,
 * a block device, memory, or a crash-simulating medium in tests.
 *
 * Offsets and lengths are byte counts; every call either completes whole or rejects.
 * A read past the end of the medium rejects (a cache device never reads as zeros by accident).
 */
export interface Medium {
  /** The device path (or a label for memory media), used in messages. */
  readonly path: string;
  /** Size in bytes, fixed for the life of the medium. */
  size(): number;
  /** Fill `buf` from `offset`. */
  read(buf: Buffer, offset: number): Promise<void>;
  /** Write `data` (one buffer, or several written back to back: a vectored write) at `offset`. */
  write(data: Buffer | readonly Buffer[], offset: number): Promise<void>;
  /** Make every completed write durable (fdatasync). */
  sync(): Promise<void>;
  /** Release the descriptor and the lock. */
  close(): Promise<void>;
}
