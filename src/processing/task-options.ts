import type { TaskProgress } from './regular-mode.ts';

/** How tasks run, shared by a whole run, its groups and its single-VM tasks. */
export interface TaskTuning {
  onProgress?: (progress: TaskProgress) => void;
  /** Aborting stops the copy; snapshots are still undone on the way out. */
  signal?: AbortSignal;
  /** Chunk reads in flight per disk. */
  readAhead?: number;
  /** Caps the read rate (bytes/s), e.g. to spare a busy production link. */
  maxReadBytesPerSecond?: number;
  /** Where VM snapshot overlays of non-file disks (RBD) go; file disks get theirs beside the image. */
  overlayFolder?: string;
  /** Freeze guest file systems through the guest agent during the VM snapshot, where there is one. */
  quiesce?: boolean;
  /** Called at the moments a crash matters most (tests use them to write, measure or kill). */
  hooks?: { beforeVmSnapshots?: () => Promise<void> | void; afterVmSnapshots?: () => Promise<void> | void; afterStorageSnapshot?: () => Promise<void> | void };
}
