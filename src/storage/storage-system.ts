/** What a storage system snapshots as one unit: a btrfs subvolume, an XFS filesystem, an RBD image. */
export interface Volume {
  readonly kind: string;
  /** Stable identity within its system: the subvolume path, the mount point, `pool/image`. */
  readonly id: string;
}

/** A snapshot we created, as the hunter sees it. */
export interface StorageSnapshotInfo {
  readonly kind: string;
  /** Where it lives (snapshot path, `pool/image@snap`); enough to remove it. */
  readonly location: string;
  /** The session id encoded in its name, so the hunter can tell a running task's snapshot from an orphan. */
  readonly sessionTag: string;
}

/** A read-only, point-in-time copy of volumes; removed when disposed. */
export interface StorageSnapshot extends AsyncDisposable {
  readonly info: readonly StorageSnapshotInfo[];
  /** Where `imagePath`, as it was at snapshot time, can be read. */
  imageAt(imagePath: string): string;
  readonly createdAt: Date;
  /** How long the snapshot has lived (until removed, then its final lifetime). */
  readonly lifetimeMs: number;
}

/** A storage system that can snapshot the volumes holding VM disks (STYLE.md). */
export interface StorageSystem {
  readonly kind: string;
  /** Which volume of this system holds `imagePath`, or undefined if it is not ours. */
  locate(imagePath: string): Promise<Volume | undefined>;
  /** A read-only, point-in-time copy of the volumes (at least of `images` on them), named for our session. */
  snapshot(volumes: readonly Volume[], sessionTag: string, images: readonly string[]): Promise<StorageSnapshot>;
  /** Snapshots this system holds that we created, on the volumes given (the hunter's view). */
  listOwnSnapshots(volumes: readonly Volume[]): Promise<StorageSnapshotInfo[]>;
  /**
   * Snapshots we keep on purpose beyond a session, as bases of changed-block tracking (`snapshift-cbt-<tag>`
   * on RBD). Not orphans: the hunter removes one only when no restore point in the catalog refers to it.
   */
  listRetainedSnapshots?(volumes: readonly Volume[]): Promise<StorageSnapshotInfo[]>;
  /** Removes one of our snapshots (the hunter's hand). */
  removeSnapshot(info: StorageSnapshotInfo): Promise<void>;
}

/**
 * A storage system that reports exactly which extents of an image changed between two of its snapshots, and
 * can keep one session's snapshot beyond the session as the base of the next diff (Ceph RBD's `rbd diff`, as
 * Benji does). Processing builds changed-block tracking on it (src/processing/snapshot-diff-cbt.ts).
 */
export interface SnapshotDiffing {
  /** The image of this system that holds `imagePath` (`pool/image`), or undefined when it is not ours. */
  diffImageOf(imagePath: string): string | undefined;
  /** The name a retained base of session `sessionTag` carries. */
  retainedNameFor(sessionTag: string): string;
  isRetainedName(name: string): boolean;
  /** Names of every snapshot of `image`, ours or not. */
  snapshotNames(image: string): Promise<string[]>;
  /** Removes a snapshot of ours by name (refuses any other). */
  removeSnapshotNamed(image: string, name: string): Promise<void>;
  /** The extents written between two snapshots of `image`, discarded ones included, sorted by offset. */
  changedExtents(image: string, fromSnapshot: string, toSnapshot: string): Promise<Array<{ offset: number; length: number }>>;
  /** The name of `imagePath`'s snapshot in `snapshot` (one this system took), or undefined. */
  snapshotNameIn(snapshot: StorageSnapshot, imagePath: string): string | undefined;
  /** Renames `imagePath`'s snapshot in `snapshot` to `name`: it then outlives the session. */
  retainIn(snapshot: StorageSnapshot, imagePath: string, name: string): Promise<void>;
}

export function hasSnapshotDiffing(system: StorageSystem): system is StorageSystem & SnapshotDiffing {
  return typeof (system as Partial<SnapshotDiffing>).changedExtents === 'function';
}

/** The prefix every storage snapshot we create carries, followed by the session tag. */
export const snapshotPrefix = 'snapshift-';
