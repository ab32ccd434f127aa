import { queryNamedBlockNodes } from './block-graph.ts';
import type { QmpSession } from './qmp-session.ts';

/** One dirty bitmap of a node, as `query-named-block-nodes` reports it (QMP reference: BlockDirtyInfo). */
export interface DirtyBitmapInfo {
  name: string;
  /** Bytes marked dirty. */
  count: number;
  granularity: number;
  /** False once disabled: it no longer records writes. */
  recording: boolean;
  persistent: boolean;
  /** Loaded from an image that was not closed cleanly (QEMU killed): its content cannot be trusted. */
  inconsistent: boolean;
  busy: boolean;
}

/**
 * Our bitmaps are named `snapshift-<chain>-<session tag>`, where `chain` (16 hex digits) names the chain of
 * restore points the bitmap serves, so several chains of one disk never touch each other's bitmaps
 * (docs/CBT.md). Bitmaps named by earlier versions, `snapshift-<session tag>`, belong to no chain.
 * Nothing without our prefix is ever touched.
 */
const bitmapPrefix = 'snapshift-';
const chainBitmapPattern = /^snapshift-([0-9a-f]{16})-/;

export function bitmapNameFor(chainKey: string, tag: string): string {
  return `${bitmapPrefix}${chainKey}-${tag}`;
}

/** Whose a bitmap is: a chain's, ours from an earlier version (`legacy`, no chain), or not ours at all. */
export type BitmapOwner = { kind: 'chain'; chainKey: string } | { kind: 'legacy' } | { kind: 'foreign' };

export function bitmapOwnerOf(name: string): BitmapOwner {
  const chainKey = chainBitmapPattern.exec(name)?.[1];
  if (chainKey !== undefined) return { kind: 'chain', chainKey };
  return name.startsWith(bitmapPrefix) ? { kind: 'legacy' } : { kind: 'foreign' };
}

/**
 * What the VM snapshot's transaction does to one node's bitmaps: `freeze` (the bitmap of the previous
 * restore point) stops recording, and `start` begins recording, at the very instant the overlays appear.
 */
export interface BitmapRotation {
  nodeName: string;
  freeze?: string;
  start: { name: string; persistent: boolean };
}

/** The dirty bitmaps of `nodeName`, empty when it has none (or no such node). */
export async function listDirtyBitmaps(qmp: QmpSession, nodeName: string): Promise<DirtyBitmapInfo[]> {
  const node = (await queryNamedBlockNodes(qmp)).find((candidate) => candidate['node-name'] === nodeName) as { 'dirty-bitmaps'?: Array<Partial<DirtyBitmapInfo>> } | undefined;
  return (node?.['dirty-bitmaps'] ?? []).map((bitmap) => ({
    name: String(bitmap.name),
    count: Number(bitmap.count ?? 0),
    granularity: Number(bitmap.granularity ?? 0),
    recording: bitmap.recording ?? false,
    persistent: bitmap.persistent ?? false,
    inconsistent: bitmap.inconsistent ?? false,
    busy: bitmap.busy ?? false,
  }));
}

/**
 * Transaction actions for `rotations`, to go before the `blockdev-snapshot-sync` actions of the same
 * transaction (QMP reference, "transaction"): all take effect with the guest's I/O drained, so the frozen
 * bitmap and the new one split the guest's writes at exactly the snapshot's instant. They must come first:
 * a persistent bitmap cannot be added to a node once it is a read-only backing file.
 */
export function bitmapRotationActions(rotations: readonly BitmapRotation[]): Array<{ type: string; data: Record<string, unknown> }> {
  const actions: Array<{ type: string; data: Record<string, unknown> }> = [];
  for (const rotation of rotations) {
    if (rotation.freeze) actions.push({ type: 'block-dirty-bitmap-disable', data: { node: rotation.nodeName, name: rotation.freeze } });
    actions.push({ type: 'block-dirty-bitmap-add', data: { node: rotation.nodeName, name: rotation.start.name, persistent: rotation.start.persistent } });
  }
  return actions;
}

export async function removeDirtyBitmap(qmp: QmpSession, nodeName: string, name: string): Promise<void> {
  await qmp.execute('block-dirty-bitmap-remove', { node: nodeName, name });
}

/**
 * Undoes a rotation whose restore point was not written, in one transaction: the frozen bitmap records
 * again and takes in what the new one saw, and the new one goes. The previous restore point's bitmap then
 * again covers every write since that restore point, so the next backup stays incremental.
 */
export async function revertBitmapRotation(qmp: QmpSession, rotation: BitmapRotation): Promise<void> {
  if (!rotation.freeze) {
    await removeDirtyBitmap(qmp, rotation.nodeName, rotation.start.name);
    return;
  }
  await qmp.execute('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-enable', data: { node: rotation.nodeName, name: rotation.freeze } },
      { type: 'block-dirty-bitmap-merge', data: { node: rotation.nodeName, target: rotation.freeze, bitmaps: [rotation.start.name] } },
      { type: 'block-dirty-bitmap-remove', data: { node: rotation.nodeName, name: rotation.start.name } },
    ],
  });
}
