import { SnapshiftError, type ErrorCode } from '../../core/errors.ts';
import { exec } from '../../core/exec.ts';
import { OwnedStorageSnapshot } from '../owned-snapshot.ts';
import { snapshotPrefix, type SnapshotDiffing, type StorageSnapshot, type StorageSnapshotInfo, type StorageSystem, type Volume } from '../storage-system.ts';

export interface CephRbdStorageOptions {
  /** ceph.conf of the cluster; default $SNAPSHIFT_CEPH_CONF, else /etc/ceph/ceph.conf. */
  confPath?: string;
}

/** An RBD image as `rbd` names it: `pool/image` or `pool/namespace/image`. */
export interface RbdImage {
  pool: string;
  namespace?: string;
  image: string;
}

/**
 * Ceph RBD: the volume is the RBD image a disk is (`rbd:pool/image`, as listQemuDisks names it); a storage
 * snapshot is an RBD snapshot `pool/image@snapshift-<session>-<n>` (~0.6 s here), read back through QEMU's
 * rbd driver. Each image is its own volume, so a VM with two RBD disks gets two RBD snapshots; the VM
 * snapshot held during both is what makes them one consistent instant.
 */
export class CephRbdStorage implements StorageSystem, SnapshotDiffing {
  readonly kind = 'ceph-rbd';
  readonly confPath: string;

  constructor(options: CephRbdStorageOptions = {}) {
    this.confPath = options.confPath ?? process.env['SNAPSHIFT_CEPH_CONF'] ?? '/etc/ceph/ceph.conf';
  }

  async locate(imagePath: string): Promise<Volume | undefined> {
    const image = parseRbdImagePath(imagePath);
    return image ? { kind: this.kind, id: imageSpec(image) } : undefined;
  }

  async snapshot(volumes: readonly Volume[], sessionTag: string, _images: readonly string[] = []) {
    const created: Array<{ volume: string; snapshotName: string }> = [];
    try {
      for (const [index, volume] of volumes.entries()) {
        const snapshotName = `${snapshotPrefix}${sessionTag}-${index}`;
        await this.#rbd(['snap', 'create', `${volume.id}@${snapshotName}`], 'STORAGE_SNAPSHOT_FAILED');
        created.push({ volume: volume.id, snapshotName });
      }
    } catch (error) {
      await Promise.allSettled(created.map((item) => this.#removeSnapshot(`${item.volume}@${item.snapshotName}`)));
      throw error;
    }
    return new RbdStorageSnapshot(this, created, sessionTag);
  }

  diffImageOf(imagePath: string): string | undefined {
    const image = parseRbdImagePath(imagePath);
    return image && imageSpec(image);
  }

  retainedNameFor(sessionTag: string): string {
    return `${retainedPrefix}${sessionTag}`;
  }

  isRetainedName(name: string): boolean {
    return isRetainedSnapshotName(name);
  }

  /** `rbd diff --from-snap`: exact, kept by Ceph itself; discarded extents are listed too (they read as zeros now). */
  async changedExtents(image: string, fromSnapshot: string, toSnapshot: string): Promise<Array<{ offset: number; length: number }>> {
    const { stdout } = await exec('rbd', ['-c', this.confPath, 'diff', '--from-snap', fromSnapshot, `${image}@${toSnapshot}`, '--format', 'json'], {
      code: 'RBD_DIFF_FAILED',
      timeoutMs: 600_000,
    });
    const extents = JSON.parse(stdout) as Array<{ offset: number; length: number }>;
    return extents.map(({ offset, length }) => ({ offset, length })).sort((a, b) => a.offset - b.offset);
  }

  snapshotNameIn(snapshot: StorageSnapshot, imagePath: string): string | undefined {
    return snapshot instanceof RbdStorageSnapshot ? snapshot.snapshotNameOf(imagePath) : undefined;
  }

  async retainIn(snapshot: StorageSnapshot, imagePath: string, name: string): Promise<void> {
    if (snapshot instanceof RbdStorageSnapshot) await snapshot.retain(imagePath, name);
  }

  /** Names of every snapshot of `image` (`pool/image`), ours or not. */
  async snapshotNames(image: string): Promise<string[]> {
    const { stdout } = await this.#rbd(['snap', 'ls', '--format', 'json', image], 'STORAGE_SNAPSHOT_LIST_FAILED');
    return (JSON.parse(stdout) as Array<{ name: string }>).map((snapshot) => snapshot.name);
  }

  /** Removes a snapshot of ours by name: a session's (`snapshift-<tag>-<n>`) or a retained CBT base. */
  async removeSnapshotNamed(image: string, name: string): Promise<void> {
    if (!snapshotTagOf(name) && !retainedTagOf(name)) throw new SnapshiftError('STORAGE_SNAPSHOT_REMOVE_FAILED', `${image}@${name} is not a snapshot snapshift made; not removing it`);
    await this.#removeSnapshot(`${image}@${name}`);
  }

  /** @internal for RbdStorageSnapshot */
  async renameSnapshot(image: string, from: string, to: string): Promise<void> {
    await this.#rbd(['snap', 'rename', `${image}@${from}`, `${image}@${to}`], 'STORAGE_SNAPSHOT_RETAIN_FAILED');
  }

  /** @internal for RbdStorageSnapshot */
  async removeSnapshotAt(location: string): Promise<void> {
    await this.#removeSnapshot(location);
  }

  /**
   * Session snapshots only: a retained CBT base (`snapshift-cbt-<tag>`) is not an orphan but the base of the
   * next `rbd diff`, so the hunter never sees it.
   */
  async listOwnSnapshots(volumes: readonly Volume[]): Promise<StorageSnapshotInfo[]> {
    const found: StorageSnapshotInfo[] = [];
    for (const volume of volumes) {
      for (const name of await this.#snapshotNamesIfPresent(volume.id)) {
        const tag = snapshotTagOf(name);
        if (tag) found.push({ kind: this.kind, location: `${volume.id}@${name}`, sessionTag: tag });
      }
    }
    return found;
  }

  async listRetainedSnapshots(volumes: readonly Volume[]): Promise<StorageSnapshotInfo[]> {
    const found: StorageSnapshotInfo[] = [];
    for (const volume of volumes) {
      for (const name of await this.#snapshotNamesIfPresent(volume.id)) {
        const tag = retainedTagOf(name);
        if (tag) found.push({ kind: this.kind, location: `${volume.id}@${name}`, sessionTag: tag });
      }
    }
    return found;
  }

  /**
   * Like `snapshotNames`, but an image that is gone holds none: Ceph refuses to remove an image that still has
   * snapshots, so a ledger row naming a deleted image must not stop the hunt on the others.
   */
  async #snapshotNamesIfPresent(image: string): Promise<string[]> {
    try {
      return await this.snapshotNames(image);
    } catch (error) {
      // rbd: "error opening image NAME: (2) No such file or directory" (ENOENT from librbd).
      if (error instanceof SnapshiftError && /error opening image .*\(2\) No such file or directory/.test(error.message)) return [];
      throw error;
    }
  }

  async removeSnapshot(info: StorageSnapshotInfo): Promise<void> {
    const name = info.location.split('@')[1] ?? '';
    // The hunter's hand only ever removes what carries our name.
    if (!snapshotTagOf(name) && !retainedTagOf(name)) throw new SnapshiftError('STORAGE_SNAPSHOT_REMOVE_FAILED', `${info.location} is not a snapshot snapshift made; not removing it`);
    await this.#removeSnapshot(info.location);
  }

  async #removeSnapshot(location: string): Promise<void> {
    await this.#rbd(['snap', 'rm', '--no-progress', location], 'STORAGE_SNAPSHOT_REMOVE_FAILED');
  }

  #rbd(args: readonly string[], code: ErrorCode) {
    return exec('rbd', ['-c', this.confPath, ...args], { code, timeoutMs: 120_000 });
  }
}

/** `rbd:pool/image` or `rbd:pool/namespace/image` (optionally `@snap` and `:key=value` options) → its parts. */
export function parseRbdImagePath(imagePath: string): RbdImage | undefined {
  const match = imagePath.match(/^rbd:([^/:@]+)\/(?:([^/:@]+)\/)?([^/:@]+)(?:@[^:]*)?(?::.*)?$/);
  if (!match) return undefined;
  return { pool: match[1]!, ...(match[2] ? { namespace: match[2] } : {}), image: match[3]! };
}

/**
 * One session's RBD snapshots. `retain` renames one to a CBT base name (rbd diff, docs/CBT.md): it then
 * outlives the session and is not removed with the rest.
 */
export class RbdStorageSnapshot extends OwnedStorageSnapshot {
  readonly #retained = new Set<string>();

  constructor(
    private readonly system: CephRbdStorage,
    private readonly created: ReadonlyArray<{ volume: string; snapshotName: string }>,
    sessionTag: string,
  ) {
    super(
      created.map((item) => ({ kind: system.kind, location: `${item.volume}@${item.snapshotName}`, sessionTag })),
      (imagePath) => {
        const image = parseRbdImagePath(imagePath);
        const holder = image && created.find((item) => item.volume === imageSpec(image));
        if (!image || !holder) throw new SnapshiftError('STORAGE_IMAGE_NOT_IN_SNAPSHOT', `${imagePath} is not a snapshotted RBD image`);
        return qemuRbdFilename(image, holder.snapshotName, system.confPath);
      },
      async () => {
        for (const item of created) if (!this.#retained.has(item.volume)) await system.removeSnapshotAt(`${item.volume}@${item.snapshotName}`);
      },
    );
  }

  holds(imagePath: string): boolean {
    return this.snapshotNameOf(imagePath) !== undefined;
  }

  /** This session's snapshot name for the image of `imagePath`. */
  snapshotNameOf(imagePath: string): string | undefined {
    const image = parseRbdImagePath(imagePath);
    return image && this.created.find((item) => item.volume === imageSpec(image))?.snapshotName;
  }

  /** Keeps the snapshot of `imagePath`'s image under `name` instead of removing it with the session's. */
  async retain(imagePath: string, name: string): Promise<void> {
    const image = parseRbdImagePath(imagePath);
    const item = image && this.created.find((candidate) => candidate.volume === imageSpec(image));
    if (!item || this.#retained.has(item.volume)) return;
    await this.system.renameSnapshot(item.volume, item.snapshotName, name);
    this.#retained.add(item.volume);
  }
}

/** Retained RBD snapshots, each the base of the next `rbd diff` of its image: `snapshift-cbt-<session tag>`. */
export const retainedPrefix = `${snapshotPrefix}cbt-`;

export function rbdImageSpec(image: RbdImage): string {
  return imageSpec(image);
}

function imageSpec(image: RbdImage): string {
  return image.namespace ? `${image.pool}/${image.namespace}/${image.image}` : `${image.pool}/${image.image}`;
}

/**
 * QEMU's own way to name a node by its options (`json:{…}`), so the exporter opens the RBD snapshot with
 * `--blockdev` options rather than a filename QEMU would have to parse (QEMU QAPI: BlockdevOptionsRbd).
 */
function qemuRbdFilename(image: RbdImage, snapshot: string, confPath: string): string {
  return `json:${JSON.stringify({ driver: 'rbd', pool: image.pool, ...(image.namespace ? { namespace: image.namespace } : {}), image: image.image, snapshot, conf: confPath })}`;
}

/** Whether `name` is a retained CBT base of ours (`snapshift-cbt-<tag>`). */
export function isRetainedSnapshotName(name: string): boolean {
  return retainedTagOf(name) !== undefined;
}

/** `snapshift-cbt-<tag>` → tag. */
function retainedTagOf(name: string): string | undefined {
  return name.match(/^snapshift-cbt-([0-9a-f]{8})$/)?.[1];
}

/** `snapshift-<tag>-<n>` → tag; anything else is not ours. */
function snapshotTagOf(name: string): string | undefined {
  return name.match(/^snapshift-([0-9a-f]{8})-\d+$/)?.[1];
}
