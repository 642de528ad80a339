/**
 * What the NBD server serves: a block device with the block-device contract. A write is
 * acknowledged when it is readable; it is durable after flush() or when written with fua.
 */
export interface BlockDevice {
  /** Size in bytes (the backing device's size). */
  size(): number;
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer, opts?: { fua?: boolean }): Promise<void>;
  /** After this the range reads as zeros (also used for TRIM). */
  writeZeroes(offset: number, length: number, opts?: { fua?: boolean }): Promise<void>;
  flush(): Promise<void>;
}
