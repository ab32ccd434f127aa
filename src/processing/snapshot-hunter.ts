import type { Catalog, HostKind } from '../catalog/index.ts';
import { messageOf } from '../core/errors.ts';
import { snapshiftProcessIsAlive } from '../core/process-alive.ts';
import type { HuntAction } from '../hypervisor/hypervisor.ts';
import { hypervisorFor } from '../hypervisor/registry.ts';

export type { HuntAction } from '../hypervisor/hypervisor.ts';

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
 * Finds VM snapshots a crashed or killed task left behind (ledger rows whose owner is gone) and has the VM's
 * hypervisor adapter undo them (commit live, or offline when the VM is gone). A row is cleared only once all
 * its overlays are dealt with. Nothing outside the ledger is ever touched.
 */
export async function huntVmSnapshots(catalog: Catalog, options: { vmName?: string; dryRun?: boolean; includeEntries?: number[] } = {}): Promise<HuntAction[]> {
  const actions: HuntAction[] = [];
  const liveTags = liveSessionTags(catalog);
  for (const entry of catalog.listVmSnapshotLedger(options.vmName)) {
    const forced = options.includeEntries?.includes(entry.id) ?? false;
    if (!forced && snapshiftProcessIsAlive(entry.ownerPid)) continue;
    const ownTag = entry.sessionId.slice(0, 8);
    // Rows from before hosts served several VMs name no host: they were QEMU's, reached by their QMP socket.
    const host = entry.hostName ? catalog.getHost(entry.hostName) : undefined;
    const kind: HostKind = host?.kind ?? (entry.adapter?.['kind'] === 'libvirt' ? 'libvirt' : 'qemu');
    // One VM that cannot be repaired (QEMU not answering, I/O errors) must not stop the hunt for the others.
    const entryActions = await Promise.resolve()
      .then(() =>
        hypervisorFor({ kind, name: entry.hostName ?? entry.vmName }).repairLedgerEntry(entry, host, {
          dryRun: options.dryRun ?? false,
          isLiveTag: (tag) => liveTags.has(tag) && !(forced && tag === ownTag),
        }),
      )
      .catch((error: unknown): HuntAction[] =>
        entry.overlays.map((overlay) => ({ vmName: entry.vmName, overlayPath: overlay.overlayPath, action: 'left-in-place', detail: messageOf(error) })),
      );
    actions.push(...entryActions);
    if (!options.dryRun && entryActions.every((action) => action.action !== 'left-in-place')) catalog.clearLedgerEntry(entry.id);
  }
  return actions;
}

/**
 * The hosts' side of the hunt: what each adapter finds named by us on its hosts (exports, overlays, fleecing)
 * of sessions no live task owns, e.g. when the ledger row was lost. A host that does not answer is skipped.
 */
export async function huntOverlaysOnHosts(catalog: Catalog, options: { dryRun?: boolean } = {}): Promise<HuntAction[]> {
  const liveTags = liveSessionTags(catalog);
  const actions: HuntAction[] = [];
  for (const host of catalog.listHosts()) {
    try {
      actions.push(...(await hypervisorFor(host).huntHost(host, { dryRun: options.dryRun ?? false, isLiveTag: (tag) => liveTags.has(tag) })));
    } catch (error) {
      actions.push({ vmName: host.name, overlayPath: '', action: 'left-in-place', detail: `host ${host.name} could not be searched: ${messageOf(error)}` });
    }
  }
  return actions;
}
