// `npm run demo` / `hallmark demo`: the whole story on one machine. A fresh authority in a temporary
// directory (generated passphrase), the servers in this process on free ports, a product, a line on
// issuing-1, a batch that registers unknown keys and a claim; a Mosquitto (the machine's binary)
// configured by writeMosquittoConfig on a free port; N simulated devices (src/demo/simulator.ts) that
// enrol over EST with the claim and publish heartbeats over MQTT/TLS. keepMosquittoInStep runs as in
// `hallmark serve --broker-dir`. Then one device is revoked: the broker disconnects it at once (dynamic
// security plugin) and refuses its next connection (CRL), while the others keep publishing. Last, a
// clone: another device's certificate presented with a different key is refused.
// Everything is stopped and the directory removed at the end, failure or not.

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Authority } from '../authority/authority.js';
import { initAuthority } from '../authority/init.js';
import { keepMosquittoInStep, writeMosquittoConfig, type SyncResult } from '../broker/mosquitto.js';
import { MOSQUITTO_BINARY, MosquittoProcess } from '../broker/mosquitto-process.js';
import { createClaim } from '../enrollment/claims.js';
import { createLogger } from '../log.js';
import { encodePem } from '../pki/pem.js';
import { startServers, type RunningServers } from '../server/servers.js';
import { connectOnce, Fleet, formatStats, type FleetStats } from './simulator.js';
import { freePort } from '../net.js';

export { MOSQUITTO_BINARY } from '../broker/mosquitto-process.js';
const ACTOR = 'demo';

export interface DemoOptions {
  /** Simulated devices. Default 100. */
  readonly devices?: number;
  /** Progress lines. Default: none. */
  readonly log?: (line: string) => void;
  /** Heartbeat interval. Default 500 ms. */
  readonly heartbeatMs?: number;
  /** How long the fleet publishes before the revocation (and again after it). Default 3 s. */
  readonly publishMs?: number;
  /** Mosquitto binary. Default /usr/sbin/mosquitto. */
  readonly mosquitto?: string;
  /** Keep the data directory (its path is in the summary). Default false. */
  readonly keep?: boolean;
}

export interface DemoSummary extends FleetStats {
  /** The temporary directory (removed at the end unless keep). */
  readonly dataDir: string;
  readonly serverUrl: string;
  readonly brokerUrl: string;
  readonly revoked: {
    readonly udid: string;
    /** The device's next connection after the revocation was refused. */
    readonly refused: boolean;
    readonly code?: string | number;
    readonly error?: string;
    /** Its connection attempts after the revocation (the CRL reload is asynchronous). */
    readonly attempts: number;
    /** Milliseconds from the revocation to the broker ending the device's open session, when it did. */
    readonly disconnectedMs?: number;
    /** How the broker ended it (MQTT v5 DISCONNECT reason). */
    readonly disconnectReason?: string;
  };
  /** Heartbeats the other devices published between the revocation and the end of the second phase. */
  readonly othersHeartbeatsAfterRevocation: number;
  /** Other devices still connected at the end. */
  readonly othersConnectedAtEnd: number;
  readonly clone: {
    /** Whose certificate was copied, and whose key presented it. */
    readonly certificateOf: string;
    readonly keyOf: string;
    readonly refused: boolean;
    readonly code?: string | number;
    readonly error?: string;
    /** The same with mosquitto_pub, when it is installed. */
    readonly mosquittoPub?: { readonly refused: boolean; readonly exitCode: number | null; readonly output: string };
  };
  readonly durationMs: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function runTool(cmd: string, args: string[], timeoutMs: number): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout!.on('data', (d: Buffer) => { output += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { output += d.toString(); });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (err) => { clearTimeout(timer); resolve({ code: -1, output: err.message }); });
    child.once('close', (code) => { clearTimeout(timer); resolve({ code, output: output.trim() }); });
  });
}

/** Runs the demo (see the header comment) and returns what happened. Throws only when it cannot be set up. */
export async function runDemo(options: DemoOptions = {}): Promise<DemoSummary> {
  const log = options.log ?? (() => {});
  const n = options.devices ?? 100;
  if (!Number.isInteger(n) || n < 3) throw new Error('the demo needs at least 3 devices (one revoked, two for the clone)');
  const heartbeatMs = options.heartbeatMs ?? 500;
  const publishMs = options.publishMs ?? 3000;
  const binary = options.mosquitto ?? MOSQUITTO_BINARY;
  if (!existsSync(binary)) throw new Error(`${binary} not found: the demo needs Mosquitto (apt-get install mosquitto)`);
  const started = performance.now();

  const dataDir = await mkdtemp(join(tmpdir(), 'hallmark-demo-'));
  let authority: Authority | undefined;
  let servers: RunningServers | undefined;
  let broker: MosquittoProcess | undefined;
  let fleet: Fleet | undefined;
  let stopSync: (() => void) | undefined;
  try {
    // 1. The authority.
    log(`[1/7] initialising an authority in ${dataDir}`);
    const passphrase = randomBytes(18).toString('base64url');
    const home = join(dataDir, 'home');
    const init = await initAuthority({ home, rootDir: join(dataDir, 'root'), org: 'Hallmark Demo', passphrase, keyBackend: 'file', actor: ACTOR });
    authority = await Authority.open(home, passphrase);
    log(`      root ${init.rootSubject}, issuing CA ${init.issuingCa}`);
    const rootPem = (await authority.caChain(await authority.rootName(), false)).map((d) => encodePem('CERTIFICATE', d)).join('');
    await writeFile(join(dataDir, 'root.pem'), rootPem);

    // 2. The servers, in this process.
    const silent = { write: () => true } as unknown as NodeJS.WritableStream;
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(silent), estPerClientPerMinute: 0 });
    log(`[2/7] servers listening: EST ${servers.httpsUrl}, CRL/OCSP ${servers.httpUrl}`);

    // 3. Product, line, batch, claim.
    await authority.registry.createProduct({ name: 'demo-sensor', actor: ACTOR });
    await authority.registry.createLine({ name: 'demo-line', ca: init.issuingCa, actor: ACTOR });
    const batch = await authority.registry.createBatch({ product: 'demo-sensor', line: 'demo-line', quota: n, allowUnregistered: true, actor: ACTOR });
    const claim = await createClaim(authority.store, { batch, uses: n, ttlMs: 3_600_000, perMinute: Math.max(600, n * 10), actor: ACTOR });
    log(`[3/7] product demo-sensor, line demo-line on ${init.issuingCa}, batch ${batch} (quota ${n}, unregistered keys allowed), claim ${claim.id} (${n} uses)`);

    // 4. The broker.
    const port = await freePort();
    const config = await writeMosquittoConfig(authority, { dir: join(dataDir, 'broker'), port, actor: ACTOR });
    broker = new MosquittoProcess(config.files.config, port, { binary, keepLog: 64_000 });
    await broker.start();
    const brokerUrl = `mqtts://127.0.0.1:${port}`;
    log(`[4/7] mosquitto listening on ${brokerUrl} (config ${config.files.config}); ${config.admin ? `admin listener ${config.admin.socket ?? `port ${config.admin.port}`} (dynamic security plugin)` : 'no dynamic security plugin: open sessions cannot be cut'}`);
    // As hallmark serve --broker-dir does: CRL and ACL follow the registry, revoked devices are disconnected.
    const syncs: SyncResult[] = [];
    stopSync = keepMosquittoInStep(authority, config.dir, { onSync: (r) => syncs.push(r), onError: (err) => log(`      broker sync: ${(err as Error).message}`) });

    // 5. The fleet.
    log(`[5/7] ${n} devices: enrol over EST with the claim, connect over MQTT/TLS, heartbeat every ${heartbeatMs} ms`);
    fleet = new Fleet({ server: servers.httpsUrl, broker: brokerUrl, trust: rootPem, claim: claim.basic, stateDir: join(dataDir, 'devices'), devices: n, heartbeatMs, log });
    await fleet.enrolAll();
    await fleet.connectAll();
    await sleep(publishMs);
    const before = fleet.stats();
    log('      summary:');
    for (const line of formatStats(before)) log(`    ${line}`);

    // 6. Revocation.
    const victim = fleet.devices[0]!;
    const others = fleet.devices.filter((d) => d !== victim);
    log(`[6/7] revoking device ${victim.udid} (keyCompromise); the broker follows (CRL, ACL, disconnection)`);
    const revokedAt = performance.now();
    const syncsBefore = syncs.length;
    await authority.revoke({ device: victim.udid }, 'keyCompromise', ACTOR);
    const othersBefore = fleet.heartbeats(victim);
    // The open session: ended by the broker at once when the configuration has an admin listener.
    const disconnectDeadline = Date.now() + (config.admin ? 5000 : 0);
    while (victim.disconnects.length === 0 && Date.now() < disconnectDeadline) await sleep(5);
    const ended = victim.disconnects[0];
    const disconnectedMs = ended ? Math.round(ended.at - revokedAt) : undefined;
    const sync = syncs.slice(syncsBefore).find((r) => r.numbers);
    if (sync) log(`      crl.pem rewritten (CRL number ${sync.numbers!.join(', ')}), SIGHUP sent to ${sync.signalled ?? 'nobody'}${sync.kick ? `, ${sync.kick.kicked.length} session(s) ended through the admin listener` : ''}`);
    log(ended
      ? `      device ${victim.udid.slice(0, 16)}… disconnected by the broker ${disconnectedMs} ms after the revocation (${ended.reason})`
      : `      device ${victim.udid.slice(0, 16)}… still connected (no admin listener: its open session stays until it closes)`);
    // Its next connection: refused (the CRL reload may still be under way: retry for a few seconds).
    let attempts = 0;
    let last: Awaited<ReturnType<typeof victim.reconnect>> | undefined;
    const deadline = Date.now() + 8000;
    while (Date.now() < deadline) {
      attempts++;
      last = await victim.reconnect();
      if (!last.ok) break;
      await sleep(200);
    }
    const revokedRefused = last !== undefined && !last.ok;
    log(revokedRefused
      ? `      device ${victim.udid.slice(0, 16)}… reconnected: REFUSED (${last!.code ?? ''} ${last!.error})`
      : `      device ${victim.udid.slice(0, 16)}… reconnected and was NOT refused (${attempts} attempts)`);
    await victim.stop();
    await sleep(publishMs);
    const othersAfter = fleet.heartbeats(victim) - othersBefore;
    const othersConnectedAtEnd = others.filter((d) => d.connected).length;
    log(`      the other ${others.length} devices: ${othersAfter} heartbeats since the revocation, ${othersConnectedAtEnd} still connected`);

    // 7. A clone: device A's certificate with device B's key.
    const a = fleet.devices[1]!;
    const b = fleet.devices[2]!;
    log(`[7/7] clone: the certificate of ${a.udid.slice(0, 16)}… presented with the key of ${b.udid.slice(0, 16)}…`);
    const clone = await connectOnce({ broker: brokerUrl, trust: rootPem, certPem: a.certPem, key: b.privateKey, clientId: `clone-${a.udid.slice(0, 16)}`, timeoutMs: 10_000 });
    if (clone.client) clone.client.end(true);
    const cloneRefused = !clone.outcome.ok;
    log(cloneRefused
      ? `      mqtt client: REFUSED (${clone.outcome.code ?? ''} ${clone.outcome.error})`
      : '      mqtt client: the clone CONNECTED (it should not have)');
    let mosquittoPub: DemoSummary['clone']['mosquittoPub'];
    const pubBinary = spawnSync('sh', ['-c', 'command -v mosquitto_pub'], { encoding: 'utf8' }).stdout.trim();
    if (pubBinary) {
      const certFile = join(dataDir, 'clone-cert.pem');
      const keyFile = join(dataDir, 'clone-key.pem');
      await writeFile(certFile, a.certPem);
      await writeFile(keyFile, b.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 });
      const r = await runTool(pubBinary, ['--cafile', config.files.ca, '--cert', certFile, '--key', keyFile, '-h', '127.0.0.1', '-p', String(port),
        '-i', `clone-pub-${a.udid.slice(0, 8)}`, '-t', `devices/${a.udid}/heartbeat`, '-m', 'clone'], 10_000);
      mosquittoPub = { refused: r.code !== 0, exitCode: r.code, output: r.output };
      log(`      mosquitto_pub: ${r.code !== 0 ? 'REFUSED' : 'CONNECTED (it should not have)'} (exit ${r.code}: ${r.output.split('\n').join(' / ')})`);
    }

    const summary: DemoSummary = {
      ...before,
      dataDir,
      serverUrl: servers.httpsUrl,
      brokerUrl,
      revoked: {
        udid: victim.udid, refused: revokedRefused, attempts, ...(last?.code !== undefined ? { code: last.code } : {}), ...(last?.error ? { error: last.error } : {}),
        ...(ended ? { disconnectedMs, disconnectReason: ended.reason } : {}),
      },
      othersHeartbeatsAfterRevocation: othersAfter,
      othersConnectedAtEnd,
      clone: {
        certificateOf: a.udid, keyOf: b.udid, refused: cloneRefused,
        ...(clone.outcome.code !== undefined ? { code: clone.outcome.code } : {}), ...(clone.outcome.error ? { error: clone.outcome.error } : {}),
        ...(mosquittoPub ? { mosquittoPub } : {}),
      },
      durationMs: Math.round(performance.now() - started),
    };
    return summary;
  } finally {
    log('stopping devices, mosquitto and the servers');
    stopSync?.();
    await fleet?.stop().catch(() => {});
    await broker?.stop().catch(() => {});
    await servers?.close().catch(() => {});
    await authority?.close().catch(() => {});
    if (!options.keep) await rm(dataDir, { recursive: true, force: true }).catch(() => {});
    log('demo finished');
  }
}
