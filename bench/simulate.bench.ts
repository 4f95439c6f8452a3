// The simulator's MQTT/TLS side at fleet scale: N devices (default 10,000) hold concurrent MQTT v5
// connections over TLS on loopback to the real Mosquitto (the machine's binary) started with the
// configuration writeMosquittoConfig makes, kept in step by keepMosquittoInStep as `hallmark serve
// --broker-dir` does. Figures:
//   - handshakes/s for the whole fleet (TLS 1.3 with a client certificate + MQTT CONNECT/CONNACK, each
//     device with its own key and certificate, the mqtt package as in src/demo/simulator.ts); ceiling in
//     the same run: the same exchange with ONE client certificate and a shared TLS context over bare
//     node:tls, raw MQTT bytes — what the broker and the TLS stack allow without the per-device client cost;
//   - seconds to connect the fleet (target: 10,000 in under 60 s);
//   - simulator memory per device (RSS delta / devices) and the broker's (its VmRSS delta / devices);
//   - revocation: from Authority.revoke() (as the admin API does in serve) to the broker ending the
//     device's session (dynamic security plugin) and to its reconnection being refused (CRL), with the
//     fleet connected; once with the uniform ACL (patterns) and once with a per-device ACL of N blocks
//     (a product policy of its own), whose SIGHUP reload re-applies N blocks to N connections.
//     Target: under 1 s. (From the `hallmark revoke` CLI in another process, add its audit-tail poll,
//     ≤ 200 ms: see test/interop/mosquitto-disconnect.test.ts.)
// The fleet's certificates are issued directly through the authority (Authority.issueForDevice), not over
// EST: 10,000 EST enrolments are bench/est-enrolment.bench.ts's subject, not this one's.
//
// Env: HALLMARK_BENCH_SIM_DEVICES [10000], HALLMARK_BENCH_SIM_CONCURRENCY [100] connections in flight,
// HALLMARK_BENCH_SIM_CEILING [3000] handshakes for the ceiling, HALLMARK_BENCH_SIM_REVOKE [5] devices revoked per layout.

import { createHash, createPublicKey } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { connect as tlsConnect, createSecureContext, type SecureContext } from 'node:tls';
import { Authority } from '../src/authority/authority.js';
import { initAuthority } from '../src/authority/init.js';
import { keepMosquittoInStep, writeMosquittoConfig, type SyncResult } from '../src/broker/mosquitto.js';
import { MOSQUITTO_BINARY, MosquittoProcess } from '../src/broker/mosquitto-process.js';
import { connectOnce, disconnectReason, newP256Key, percentile } from '../src/demo/simulator.js';
import { freePort } from '../src/net.js';
import { createCsr } from '../src/pki/csr.js';
import { encodeNameString } from '../src/pki/names.js';
import { encodePem } from '../src/pki/pem.js';
import { setProductPolicy } from '../src/registry/product-policy.js';
import { figure, log, type Figure } from './figure.js';
import type { KeyObject } from 'node:crypto';
import type { MqttClient } from 'mqtt';

const WANTED = Number(process.env.HALLMARK_BENCH_SIM_DEVICES ?? 10_000);
const CONCURRENCY = Number(process.env.HALLMARK_BENCH_SIM_CONCURRENCY ?? 100);
const CEILING_HANDSHAKES = Number(process.env.HALLMARK_BENCH_SIM_CEILING ?? 3000);
const REVOKE = Number(process.env.HALLMARK_BENCH_SIM_REVOKE ?? 5);
const PASSPHRASE = 'simulate bench passphrase';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The soft and hard limits on open files of this process (Linux /proc), or undefined. */
function openFileLimits(pid: number | 'self' = 'self'): { soft: number; hard: number } | undefined {
  try {
    const line = readFileSync(`/proc/${pid}/limits`, 'utf8').split('\n').find((l) => l.startsWith('Max open files'));
    const m = line && /Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/.exec(line);
    if (!m) return undefined;
    const n = (s: string): number => (s === 'unlimited' ? Number.MAX_SAFE_INTEGER : Number(s));
    return { soft: n(m[1]!), hard: n(m[2]!) };
  } catch {
    return undefined;
  }
}

/** CPU seconds (user + system) a process has used so far (Linux /proc/PID/stat), or 0. */
function cpuSeconds(pid: number): number {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
  } catch {
    return 0;
  }
}

const ownCpu = (): number => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; };

function vmRss(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

async function pool<T>(items: readonly T[], concurrency: number, fn: (item: T, i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, items.length)) }, async () => {
    while (next < items.length) { const i = next++; await fn(items[i]!, i); }
  }));
}

/** MQTT 3.1.1 CONNECT (clean session, keepalive 60) for a client id. */
function connectPacket(clientId: string): Buffer {
  const id = Buffer.from(clientId, 'utf8');
  const body = Buffer.concat([Buffer.from([0x00, 0x04]), Buffer.from('MQTT'), Buffer.from([0x04, 0x02, 0x00, 0x3c]), Buffer.from([id.length >> 8, id.length & 0xff]), id]);
  return Buffer.concat([Buffer.from([0x10, body.length]), body]);
}

/** One TLS handshake + CONNECT/CONNACK with a shared secure context (the ceiling's unit of work). */
function rawConnect(port: number, context: SecureContext, clientId: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, secureContext: context, servername: 'localhost' });
    const timer = setTimeout(() => { socket.destroy(); reject(new Error('ceiling: timed out')); }, 15_000);
    socket.once('secureConnect', () => socket.write(connectPacket(clientId)));
    socket.once('data', (d: Buffer) => {
      clearTimeout(timer);
      socket.destroy();
      if (d[0] === 0x20 && d[3] === 0x00) resolve();
      else reject(new Error(`ceiling: CONNACK ${d.toString('hex')}`));
    });
    socket.once('error', (err) => { clearTimeout(timer); reject(err); });
  });
}

interface Device { udid: string; key: KeyObject; certPem: string; client?: MqttClient; closedAt?: number; reason?: string }

export async function run(): Promise<Figure[]> {
  if (!existsSync(MOSQUITTO_BINARY)) {
    log(`simulate: ${MOSQUITTO_BINARY} not found (apt-get install mosquitto): skipped`);
    return [];
  }
  // File descriptors: one per connection here and in the broker, plus a margin.
  const limits = openFileLimits();
  let devices = WANTED;
  let limitNote = '';
  if (limits && limits.soft < WANTED + 500) {
    devices = Math.max(100, limits.soft - 500);
    limitNote = `; this process may open ${limits.soft} files (ulimit -n; hard ${limits.hard}): ${devices} devices instead of ${WANTED} — raise it with "ulimit -n ${WANTED + 1000}" before npm run bench`;
    log(`simulate: WARNING${limitNote}`);
  }

  const dir = await mkdtemp(join(tmpdir(), 'hallmark-bench-sim-'));
  const home = join(dir, 'home');
  let authority: Authority | undefined;
  let broker: MosquittoProcess | undefined;
  let stopSync: (() => void) | undefined;
  const fleet: Device[] = [];
  try {
    await initAuthority({ home, rootDir: join(dir, 'root'), org: 'Bench', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'bench' });
    authority = await Authority.open(home, PASSPHRASE);
    const rootPem = (await authority.caChain(await authority.rootName(), false)).map((d) => encodePem('CERTIFICATE', d)).join('');
    await authority.registry.createProduct({ name: 'meter', actor: 'bench' });
    await authority.registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: 'bench' });
    const batch = await authority.registry.createBatch({ product: 'meter', line: 'line-a', quota: devices, actor: 'bench' });

    // The fleet's identities, issued directly (see the header).
    let t0 = performance.now();
    const keys = Array.from({ length: devices }, () => newP256Key());
    const spkis = keys.map((k) => createPublicKey(k).export({ type: 'spki', format: 'der' }));
    for (let i = 0; i < devices; i += 2000) await authority.registry.registerDevices(batch, spkis.slice(i, i + 2000).map((publicKeySpki) => ({ publicKeySpki })), 'bench');
    await pool(keys, 32, async (key, i) => {
      const udid = createHash('sha256').update(spkis[i]!).digest('hex');
      const cert = await authority!.issueForDevice({ udid, csr: createCsr({ subject: encodeNameString('CN=bench'), privateKey: key }), actor: 'bench' });
      fleet[i] = { udid, key, certPem: encodePem('CERTIFICATE', cert.der) + encodePem('CERTIFICATE', cert.chain[0]!) };
    });
    log(`simulate: ${devices} device certificates issued through the authority in ${((performance.now() - t0) / 1000).toFixed(1)} s`);

    const port = await freePort();
    const config = await writeMosquittoConfig(authority, { dir: join(dir, 'broker'), port, actor: 'bench' });
    broker = new MosquittoProcess(config.files.config, port, { maxOpenFiles: devices + 1000, keepLog: 20_000 });
    await broker.start();
    const brokerLimits = openFileLimits(broker.pid!);
    log(`simulate: mosquitto ${broker.pid} listening on ${port} (open files: ${brokerLimits?.soft ?? '?'}), admin ${config.admin ? config.admin.socket ?? config.admin.port : 'none'}`);
    const syncs: SyncResult[] = [];
    stopSync = keepMosquittoInStep(authority, config.dir, { onSync: (r) => syncs.push(r), onError: (e) => log(`simulate: broker sync: ${(e as Error).message}`) });
    const broker0 = vmRss(broker.pid!);

    // Ceiling: the same exchange, one certificate, one shared secure context, bare node:tls.
    const context = createSecureContext({ ca: rootPem, cert: fleet[0]!.certPem, key: fleet[0]!.key.export({ type: 'pkcs8', format: 'pem' }) as string, minVersion: 'TLSv1.2' });
    await pool(Array.from({ length: 200 }, (_, i) => i), CONCURRENCY, (i) => rawConnect(port, context, `warm-${i}`)); // warm-up
    let brokerCpu0 = cpuSeconds(broker.pid!);
    let ownCpu0 = ownCpu();
    t0 = performance.now();
    await pool(Array.from({ length: CEILING_HANDSHAKES }, (_, i) => i), CONCURRENCY, (i) => rawConnect(port, context, `ceiling-${i}`));
    const ceilingRate = CEILING_HANDSHAKES / ((performance.now() - t0) / 1000);
    const ceilingBrokerMs = (cpuSeconds(broker.pid!) - brokerCpu0) * 1000 / CEILING_HANDSHAKES;
    const ceilingClientMs = (ownCpu() - ownCpu0) * 1000 / CEILING_HANDSHAKES;
    log(`simulate: ceiling ${Math.round(ceilingRate)} handshakes/s (${CEILING_HANDSHAKES}, ${CONCURRENCY} in flight, one certificate); CPU per handshake: broker ${ceilingBrokerMs.toFixed(2)} ms, client ${ceilingClientMs.toFixed(2)} ms`);
    await sleep(500);

    // The fleet.
    const url = `mqtts://127.0.0.1:${port}`;
    const heap0 = process.memoryUsage();
    let failed = 0;
    const failures = new Map<string, number>();
    let done = 0;
    brokerCpu0 = cpuSeconds(broker.pid!);
    ownCpu0 = ownCpu();
    t0 = performance.now();
    await pool(fleet, CONCURRENCY, async (d, i) => {
      const { outcome, client } = await connectOnce({ broker: url, trust: rootPem, certPem: d.certPem, key: d.key, clientId: `d${i}`, timeoutMs: 30_000 });
      if (!client) {
        failed++;
        const why = `${outcome.code ?? ''} ${outcome.error ?? ''}`.trim().slice(0, 80);
        failures.set(why, (failures.get(why) ?? 0) + 1);
      } else {
        d.client = client;
        let code: number | undefined;
        client.on('disconnect', (p) => { code = p.reasonCode ?? 0; });
        client.on('close', () => { if (d.closedAt === undefined) { d.closedAt = performance.now(); d.reason = disconnectReason(code); } });
        client.on('error', () => {});
      }
      if (++done % Math.ceil(devices / 10) === 0) log(`simulate: ${done}/${devices} connected (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
    });
    const connectS = (performance.now() - t0) / 1000;
    const connected = fleet.filter((d) => d.client?.connected).length;
    const rate = connected / connectS;
    const fleetBrokerMs = (cpuSeconds(broker.pid!) - brokerCpu0) * 1000 / Math.max(1, connected);
    const fleetClientMs = (ownCpu() - ownCpu0) * 1000 / Math.max(1, connected);
    const cores = (await import('node:os')).cpus().length;
    log(`simulate: CPU per device connection: broker ${fleetBrokerMs.toFixed(2)} ms, simulator ${fleetClientMs.toFixed(2)} ms (${cores} cores; load average ${(await import('node:os')).loadavg().map((x) => x.toFixed(1)).join(' ')})`);
    // Hold them a moment, then count who is still there.
    await sleep(3000);
    const held = fleet.filter((d) => d.client?.connected).length;
    const heap1 = process.memoryUsage();
    const perDevice = (heap1.rss - heap0.rss) / Math.max(1, connected);
    const brokerPerDevice = (vmRss(broker.pid!) - broker0) / Math.max(1, connected);
    log(`simulate: ${connected}/${devices} connected in ${connectS.toFixed(1)} s = ${Math.round(rate)}/s, ${held} held after 3 s; ${failed} failed${failed ? `: ${[...failures].map(([w, n]) => `${n} × ${w}`).join('; ')}` : ''}`);
    log(`simulate: simulator RSS +${((heap1.rss - heap0.rss) / 1048576).toFixed(0)} MB (${(perDevice / 1024).toFixed(1)} KiB/device; heap +${((heap1.heapUsed - heap0.heapUsed) / 1048576).toFixed(0)} MB), broker +${(brokerPerDevice / 1024).toFixed(1)} KiB/device`);

    // Revocation with the fleet connected: uniform ACL, then per-device ACL.
    const revocation = async (label: string, from: number): Promise<{ kicked: number[]; refused: number[] }> => {
      const kicked: number[] = [];
      const refused: number[] = [];
      for (let k = 0; k < REVOKE; k++) {
        const d = fleet[from + k]!;
        if (!d.client?.connected) continue;
        const start = performance.now();
        await authority!.revoke({ device: d.udid }, 'keyCompromise', 'bench');
        const deadline = Date.now() + 10_000;
        while (d.closedAt === undefined && Date.now() < deadline) await sleep(1);
        if (d.closedAt !== undefined) kicked.push(d.closedAt - start);
        for (;;) {
          const again = await connectOnce({ broker: url, trust: rootPem, certPem: d.certPem, key: d.key, clientId: `again-${from + k}`, timeoutMs: 10_000 });
          if (!again.client) { refused.push(performance.now() - start); break; }
          again.client.end(true);
          if (Date.now() > deadline) break;
          await sleep(5);
        }
        await sleep(300);
      }
      log(`simulate: revocation (${label}): ended ${kicked.map((x) => x.toFixed(0)).join(', ')} ms; refused ${refused.map((x) => x.toFixed(0)).join(', ')} ms after revoke()`);
      return { kicked, refused };
    };
    const uniform = await revocation('uniform ACL', 1);

    // A second product on the default policy and meter on a policy of its own: products differ, so the
    // ACL becomes one block per device.
    await authority.registry.createProduct({ name: 'gauge', actor: 'bench' });
    t0 = performance.now();
    const syncsBefore = syncs.length;
    await setProductPolicy(authority.store, { product: 'meter', policy: JSON.stringify({ mqtt: { publish: ['devices/{udid}/#', 'telemetry/{udid}'], subscribe: ['devices/{udid}/commands/#'] } }), actor: 'bench' });
    const deadline = Date.now() + 30_000;
    while (!syncs.slice(syncsBefore).some((s) => s.acl?.layout === 'per-device') && Date.now() < deadline) await sleep(5);
    const perDeviceSync = syncs.slice(syncsBefore).find((s) => s.acl?.layout === 'per-device');
    const aclMs = performance.now() - t0;
    const uniformReloads = syncs.slice(0, syncsBefore).flatMap((x) => (x.reloadMs !== undefined && x.kick ? [x.reloadMs] : []));
    log(`simulate: policy change → per-device ACL of ${perDeviceSync?.acl?.devices ?? '?'} devices written, SIGHUP sent and the reload over ${aclMs.toFixed(0)} ms later (reload ${perDeviceSync?.reloadMs?.toFixed(0) ?? '?'} ms; uniform-ACL reloads with the fleet connected: ${uniformReloads.map((x) => x.toFixed(0)).join(', ')} ms)`);
    await sleep(1000);
    const perDeviceAcl = await revocation('per-device ACL', 1 + REVOKE);
    const stillConnected = fleet.filter((d) => d.client?.connected).length;
    const expected = connected - uniform.kicked.length - perDeviceAcl.kicked.length;
    log(`simulate: ${stillConnected} of the other devices still connected (expected ${expected})`);

    const med = (xs: number[]): number => Math.round(percentile(xs, 50));
    const max = (xs: number[]): number => Math.round(Math.max(0, ...xs));
    const within = (xs: number[]): string => (xs.length === REVOKE && max(xs) < 1000 ? 'met' : 'MISSED');
    const ulimitNote = `open files: bench ${limits?.soft ?? '?'}, broker ${brokerLimits?.soft ?? '?'}${limitNote}`;
    return [
      figure('MQTT/TLS handshakes, simulated fleet', Math.round(rate), 'handshakes/s', Math.round(ceilingRate),
        `${connected}/${devices} devices (own key and certificate each, mqtt package, MQTT v5, TLS 1.3) connected in ${connectS.toFixed(1)} s with ${CONCURRENCY} in flight; ${held} still connected 3 s later; CPU per connection: broker ${fleetBrokerMs.toFixed(2)} ms, simulator ${fleetClientMs.toFixed(2)} ms (ceiling: ${ceilingBrokerMs.toFixed(2)} / ${ceilingClientMs.toFixed(2)} ms) on ${cores} cores; target 10,000 in < 60 s ${connected >= 10_000 && connectS < 60 ? 'met' : 'MISSED'}; ceiling = TLS + CONNECT/CONNACK with one certificate and a shared TLS context over node:tls, same broker, same run; ${ulimitNote}`),
      figure('simulator memory per connected device', Math.round(perDevice / 1024 * 10) / 10, 'KiB/device', null,
        `RSS delta / devices in the simulating process (heap +${((heap1.heapUsed - heap0.heapUsed) / 1048576).toFixed(0)} MB); the broker: ${(brokerPerDevice / 1024).toFixed(1)} KiB/device (VmRSS delta)`),
      figure('revocation → session ended (uniform ACL)', med(uniform.kicked), 'ms', null,
        `median of ${uniform.kicked.length}, max ${max(uniform.kicked)} ms, from Authority.revoke() to the device's MQTT session closed by the broker (DISCONNECT 0x98), ${connected} devices connected; target < 1 s ${within(uniform.kicked)}`),
      figure('revocation → reconnection refused (uniform ACL)', med(uniform.refused), 'ms', null,
        `median of ${uniform.refused.length}, max ${max(uniform.refused)} ms: TLS alert certificate revoked at the first attempt after the session ended; target < 1 s ${within(uniform.refused)}`),
      figure(`revocation → session ended (per-device ACL, ${perDeviceSync?.acl?.devices ?? '?'} blocks)`, med(perDeviceAcl.kicked), 'ms', null,
        `median of ${perDeviceAcl.kicked.length}, max ${max(perDeviceAcl.kicked)} ms; the policy change itself was in force ${aclMs.toFixed(0)} ms later, the broker blocked ${perDeviceSync?.reloadMs?.toFixed(0) ?? '?'} ms by its reload (uniform ACL: ${Math.round(percentile(uniformReloads, 50))} ms); target < 1 s ${within(perDeviceAcl.kicked)}`),
      figure(`revocation → reconnection refused (per-device ACL)`, med(perDeviceAcl.refused), 'ms', null,
        `median of ${perDeviceAcl.refused.length}, max ${max(perDeviceAcl.refused)} ms; ${stillConnected} other devices still connected (expected ${expected}); target < 1 s ${within(perDeviceAcl.refused)}`),
    ];
  } finally {
    stopSync?.();
    await Promise.all(fleet.map((d) => new Promise<void>((r) => { if (d.client) d.client.end(true, {}, () => r()); else r(); })));
    await broker?.stop();
    await authority?.close();
    await rm(dir, { recursive: true, force: true });
  }
}
