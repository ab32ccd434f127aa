import { existsSync } from 'node:fs';
import { snapshiftProcessIsAlive } from '../core/process-alive.ts';
import { rm } from 'node:fs/promises';
import type { Catalog, VmSnapshotLedgerEntry } from '../catalog/index.ts';
import { exec } from '../core/exec.ts';
import { messageOf } from '../core/errors.ts';
import { faultPoint } from '../core/fault-points.ts';
import { QemuHost } from '../hypervisor/qemu/qemu-host.ts';
import { backingChildOf, blockNodeNames, queryNamedBlockNodes } from '../hypervisor/qemu/block-graph.ts';
import { commitOverlay } from '../hypervisor/qemu/block-commit.ts';
import { removeLeftoverExports } from '../hypervisor/qemu/qemu-nbd-export.ts';

export interface HuntAction {
  vmName: string;
  overlayPath: string;
  /** What was (or, in a dry run, would be) done. */
  action: 'committed-live' | 'committed-offline' | 'removed-unused-file' | 'removed-export' | 'already-gone' | 'left-in-place';
  detail: string;
}


/**
 * Tags of sessions whose owner still runs: what carries them (overlays, exports, bitmaps) is not ours to
 * touch. A job's VM-snapshot ledger rows and storage-snapshot ledger rows both count.
 */
export function liveSessionTags(catalog: Catalog): Set<string> {
  const tags = new Set<string>();
  for (const entry of catalog.listVmSnapshotLedger()) if (snapshiftProcessIsAlive(entry.ownerPid)) tags.add(entry.sessionId.slice(0, 8));
  for (const entry of catalog.listStorageSnapshotLedger()) if (snapshiftProcessIsAlive(entry.ownerPid)) tags.add(entry.sessionTag);
  return tags;
}

/**
 * Finds VM snapshots a crashed or killed task left behind (ledger rows whose owner is gone) and removes them:
 * an overlay still active in a running QEMU is committed live; one whose QEMU is gone is committed offline
 * with qemu-img (which refuses if anyone still holds the image); a file no chain uses is deleted. A row is
 * cleared only once all its overlays are dealt with. Nothing outside the ledger is ever touched.
 */
export async function huntVmSnapshots(catalog: Catalog, options: { vmName?: string; dryRun?: boolean; includeEntries?: number[] } = {}): Promise<HuntAction[]> {
  const actions: HuntAction[] = [];
  const liveTags = liveSessionTags(catalog);
  for (const entry of catalog.listVmSnapshotLedger(options.vmName)) {
    const forced = options.includeEntries?.includes(entry.id) ?? false;
    if (!forced && snapshiftProcessIsAlive(entry.ownerPid)) continue;
    // One VM that cannot be repaired (QEMU not answering, I/O errors) must not stop the hunt for the others.
    const entryActions = await recoverEntry(entry, options.dryRun ?? false, (tag) => liveTags.has(tag) && !(forced && tag === entry.sessionId.slice(0, 8))).catch((error: unknown): HuntAction[] =>
      entry.overlays.map((overlay) => ({ vmName: entry.vmName, overlayPath: overlay.overlayPath, action: 'left-in-place', detail: messageOf(error) })),
    );
    actions.push(...entryActions);
    if (!options.dryRun && entryActions.every((action) => action.action !== 'left-in-place')) catalog.clearLedgerEntry(entry.id);
  }
  return actions;
}

async function recoverEntry(entry: VmSnapshotLedgerEntry, dryRun: boolean, isLive: (tag: string) => boolean): Promise<HuntAction[]> {
  const actions: HuntAction[] = [];
  let host: QemuHost | undefined;
  try {
    host = await QemuHost.connect({ name: entry.vmName, qmpSocketPath: entry.qmpSocketPath }, 5_000);
  } catch {
    host = undefined; // QEMU is gone (or not answering): only offline repair is possible
  }
  try {
    if (host && !dryRun) await removeLeftoverExports(host.qmp, isLive);
    const liveNodes = host ? await blockNodeNames(host.qmp) : undefined;
    for (const overlay of entry.overlays) {
      const base = { vmName: entry.vmName, overlayPath: overlay.overlayPath };
      if (liveNodes?.has(overlay.overlayNodeName)) {
        if (!dryRun) {
          faultPoint('hunt.before-commit');
          await commitOverlay(host!.qmp, overlay);
        }
        actions.push({ ...base, action: 'committed-live', detail: `block-commit of ${overlay.overlayNodeName} into ${overlay.baseNodeName}` });
      } else if (!existsSync(overlay.overlayPath)) {
        actions.push({ ...base, action: 'already-gone', detail: 'no overlay file and no node: nothing to do' });
      } else if (liveNodes) {
        // QEMU runs but does not use the file: the snapshot never became active (or was committed already).
        if (!dryRun) await rm(overlay.overlayPath, { force: true });
        actions.push({ ...base, action: 'removed-unused-file', detail: 'QEMU does not use it' });
      } else {
        try {
          // The overlay may hold guest writes made after the snapshot: merge them, never just delete.
          if (!dryRun) {
            await exec('qemu-img', ['commit', '-q', '-f', 'qcow2', overlay.overlayPath]);
            await rm(overlay.overlayPath, { force: true });
          }
          actions.push({ ...base, action: 'committed-offline', detail: 'QEMU is not running: qemu-img commit into the base image' });
        } catch (error) {
          actions.push({ ...base, action: 'left-in-place', detail: `cannot reach QEMU and cannot commit offline: ${messageOf(error)}` });
        }
      }
    }
  } finally {
    await host?.close();
  }
  return actions;
}

/**
 * The hosts' side of the hunt: overlay nodes named by us (`snapshift-<tag>-<n>`) that are still active in a
 * running QEMU although no live task owns their tag (e.g. the ledger row was lost) are committed. A host that
 * does not answer quickly (busy with another client) is skipped, never waited for.
 */
export async function huntOverlaysOnHosts(catalog: Catalog, options: { dryRun?: boolean } = {}): Promise<HuntAction[]> {
  const liveTags = liveSessionTags(catalog);
  const actions: HuntAction[] = [];
  for (const record of catalog.listHosts()) {
    let host: QemuHost;
    try {
      host = await QemuHost.connect(record, 3_000);
    } catch {
      continue;
    }
    try {
      // Exports a killed task left (e.g. a changed-block export opened before any snapshot was taken).
      const exports = options.dryRun ? [] : await removeLeftoverExports(host.qmp, (tag) => liveTags.has(tag)).catch(() => []);
      for (const id of exports) actions.push({ vmName: record.name, overlayPath: '', action: 'removed-export', detail: `NBD export ${id} of a session that is no longer running` });
      for (const node of await queryNamedBlockNodes(host.qmp).catch(() => [])) {
        const tag = node['node-name'].match(/^snapshift-([0-9a-f]{8})-\d+$/)?.[1];
        if (!tag || liveTags.has(tag)) continue;
        const base = await backingChildOf(host.qmp, node['node-name']);
        if (!base) continue;
        const overlay = { baseNodeName: base, overlayNodeName: node['node-name'], overlayPath: node.file };
        try {
          if (!options.dryRun) {
            faultPoint('hunt.before-commit');
            await commitOverlay(host.qmp, overlay);
          }
          actions.push({ vmName: record.name, overlayPath: node.file, action: 'committed-live', detail: `overlay ${node['node-name']} of a session that is no longer running` });
        } catch (error) {
          actions.push({ vmName: record.name, overlayPath: node.file, action: 'left-in-place', detail: `could not commit: ${messageOf(error)}` });
        }
      }
    } finally {
      await host.close();
    }
  }
  return actions;
}
