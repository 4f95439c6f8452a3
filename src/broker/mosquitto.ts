// A Mosquitto (2.0.x) configuration for devices that connect with their Hallmark identity:
//
//   mosquitto.conf     per_listener_settings true; the device listener (TLS: require_certificate,
//                      use_identity_as_username — the username is the certificate's CN, the device UDID —
//                      cafile, certfile, keyfile, crlfile, acl_file) and, when the dynamic security plugin
//                      is installed, an admin listener (a Unix socket in DIR, or a loopback port) that only
//                      Hallmark's control client uses, to disconnect devices at once; pid_file for SIGHUP
//   ca.pem             the CA certificates EST /cacerts serves: the active issuing CAs and the root(s)
//   server.pem         the broker's TLS server certificate (issued by Hallmark) followed by its issuing CA
//   server.key         the broker's own private key (PKCS#8 PEM, mode 0600) — not a CA key
//   crl.pem            the full CRL of every active issuing CA, concatenated (Mosquitto takes one crlfile)
//   acl                each device's topics from its product's policy (mosquitto-acl.ts)
//   dynsec.json        the dynamic security plugin's state: only the admin client (password hash)
//   broker-admin.json  the admin client's password and where to reach it (mode 0600)
//   hallmark-broker.json  the choices a sync must repeat (the ACL layout)
//   README.txt         how to run it and how it is kept current
//
// syncMosquitto rewrites crl.pem and acl atomically, sends SIGHUP to the broker named by the pid file
// (Mosquitto 2.0.x then reloads its TLS files and its acl_file, re-applying the ACL to open connections)
// and, through the admin listener, disconnects the sessions of devices that were revoked, suspended or
// decommissioned (mosquitto-admin.ts). keepMosquittoInStep does that whenever the registry or the
// revocation state changes (a tail of the audit log plus the authority's 'revoked' events).

import { X509Certificate, generateKeyPair, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { chmod, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { userInfo } from 'node:os';
import { join, resolve } from 'node:path';
import type { Authority, IssuedCertificate } from '../authority/authority.js';
import { CrlPublisher, type CrlRecord } from '../authority/crl-publisher.js';
import { rolloverLinks, subjectAltNames } from '../authority/server-tls.js';
import { HallmarkError } from '../errors.js';
import type { Signer } from '../keys/key-backend.js';
import { freePort } from '../net.js';
import { decodePemBlocks, encodePem } from '../pki/pem.js';
import { caCertificates } from '../protocols/est/routes.js';
import { crlPublisherOf } from '../protocols/crl/routes.js';
import type { Store } from '../store/database.js';
import { buildAcl, type AclChoice, type AclLayout } from './mosquitto-acl.js';
import { ADMIN_FILE, ADMIN_USERNAME, MosquittoAdmin, dynsecConfig, newAdminPassword, readAdminCredentials, type AdminCredentials, type KickResult } from './mosquitto-admin.js';

export const MOSQUITTO_FILES = {
  config: 'mosquitto.conf',
  ca: 'ca.pem',
  cert: 'server.pem',
  key: 'server.key',
  crl: 'crl.pem',
  acl: 'acl',
  dynsec: 'dynsec.json',
  admin: ADMIN_FILE,
  socket: 'admin.sock',
  settings: 'hallmark-broker.json',
  pid: 'mosquitto.pid',
  readme: 'README.txt',
} as const;

/** The default product policy as acl_file pattern lines (what a fleet on the default policy gets). */
export const DEFAULT_DEVICE_ACL = [
  'pattern write devices/%u/#',
  'pattern read devices/%u/commands/#',
] as const;

/** Where Mosquitto's dynamic security plugin is installed by the usual packages. */
export function findDynsecPlugin(): string | undefined {
  const name = 'mosquitto_dynamic_security.so';
  const candidates = ['/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib/arm-linux-gnueabihf', '/usr/lib', '/usr/lib64', '/usr/local/lib', '/usr/lib/mosquitto', '/opt/homebrew/lib']
    .map((d) => join(d, name));
  try {
    for (const d of readdirSync('/usr/lib')) if (/-linux-gnu/.test(d)) candidates.push(join('/usr/lib', d, name));
  } catch { /* no /usr/lib */ }
  return candidates.find((p) => existsSync(p));
}

export interface MosquittoOptions {
  /** Directory to write into (created; made absolute, since mosquitto.conf names files by path). */
  readonly dir: string;
  /** TLS listener port. Default 8883. */
  readonly port?: number;
  /** Address the listener binds. Default 127.0.0.1. */
  readonly host?: string;
  /** Extra DNS names / IP addresses for the broker's certificate (localhost and 127.0.0.1 always). */
  readonly dnsNames?: readonly string[];
  readonly ipAddresses?: readonly string[];
  /**
   * The `user` line: when started as root Mosquitto switches to this user (its default is `mosquitto`,
   * which could not read the 0600 key written here). Default: the user writing the files.
   */
  readonly user?: string;
  /** Issuing CA for the broker's certificate. Default: the authority's default issuer. */
  readonly ca?: string;
  /**
   * The dynamic security plugin (.so) for the admin listener that disconnects devices at once. Default:
   * found in the usual places (findDynsecPlugin). false: no admin listener (devices are refused at their
   * next connection only).
   */
  readonly dynsecPlugin?: string | false;
  /** The admin listener on 127.0.0.1:PORT instead of the Unix socket DIR/admin.sock. */
  readonly adminPort?: number;
  /**
   * 'auto' (default): one set of pattern lines when every product has the same policy, else a block per
   * device. 'per-device': always a block per device (a certificate that names no registry device gets
   * nothing). See mosquitto-acl.ts.
   */
  readonly acl?: AclChoice;
  readonly actor: string;
}

export interface MosquittoConfig {
  readonly dir: string;
  readonly files: { readonly [K in keyof typeof MOSQUITTO_FILES]: string };
  readonly server: IssuedCertificate;
  /** Names of the issuing CAs whose CRLs are in crl.pem, and those left out (with why). */
  readonly crlCas: readonly string[];
  readonly crlSkipped: readonly string[];
  /** The admin listener (no password here: that is in broker-admin.json), when the plugin was found. */
  readonly admin?: { readonly plugin: string; readonly socket?: string; readonly port?: number };
  readonly acl: { readonly layout: AclLayout; readonly devices: number; readonly warnings: readonly string[] };
}

const pathsIn = (dir: string): MosquittoConfig['files'] =>
  Object.fromEntries(Object.entries(MOSQUITTO_FILES).map(([k, f]) => [k, join(dir, f)])) as MosquittoConfig['files'];

/** Writes `data` to `path` through a temporary file and a rename, so a reader never sees half a file. */
async function writeAtomic(path: string, data: string | Buffer, mode = 0o644): Promise<void> {
  const tmp = `${path}.${process.pid}.${Date.now()}.tmp`;
  await writeFile(tmp, data, { mode });
  await chmod(tmp, mode); // writeFile's mode is filtered by the umask
  await rename(tmp, path);
}

function ecKey(): Promise<{ publicKey: KeyObject; privateKey: KeyObject }> {
  return new Promise((res, rej) => generateKeyPair('ec', { namedCurve: 'P-256' }, (err, publicKey, privateKey) => (err ? rej(err) : res({ publicKey, privateKey }))));
}

/** A Signer over a key held in memory here (issueForOwnKey needs only its public key). */
function memorySigner(privateKey: KeyObject, publicKey: KeyObject): Signer {
  return {
    ref: { backend: 'file', id: 'mosquitto-broker', algorithm: 'ecdsa-p256' },
    publicKeySpki: publicKey.export({ type: 'spki', format: 'der' }),
    sign: async (data) => cryptoSign('sha256', data, privateKey),
  };
}

/**
 * The PEM CRLs Mosquitto needs: the full CRL of every active issuing CA, each including every revocation
 * committed so far. Mosquitto (OpenSSL without X509_V_FLAG_USE_DELTAS) reads full CRLs only, so when the
 * publisher's delta has entries a new full CRL is made at once. A CA whose key is not online (a factory
 * station's) contributes the full CRL stored for it while it is valid; a CA that has none is left out
 * (`skipped`: Mosquitto then refuses its devices, since OpenSSL finds no CRL for their issuer).
 */
export async function brokerCrls(authority: Authority): Promise<{ pem: string; cas: string[]; crls: CrlRecord[]; skipped: string[] }> {
  const shared = crlPublisherOf(authority);
  const publisher = shared ?? new CrlPublisher(authority, { checkEveryMs: 0, actor: 'broker' });
  try {
    const cas = (await authority.listCas()).filter((c) => c.role === 'intermediate' && c.status === 'active');
    if (cas.length === 0) throw new HallmarkError('CA_NOT_FOUND', 'no active issuing CA: nothing to build a CRL file from');
    const crls: CrlRecord[] = [];
    const names: string[] = [];
    const skipped: string[] = [];
    for (const ca of cas) {
      let crl: CrlRecord;
      try {
        // recheck: a device suspended or resumed (or a revocation) by another process since the last look.
        const delta = await publisher.current(ca.name, 'delta', { recheck: true });
        crl = delta.entries > 0 ? (await publisher.regenerate(ca.name)).full : await publisher.current(ca.name, 'full');
      } catch (first) {
        try {
          crl = await publisher.current(ca.name, 'full');
        } catch {
          skipped.push(`${ca.name}: ${(first as Error).message}`);
          continue;
        }
      }
      crls.push(crl);
      names.push(ca.name);
    }
    if (crls.length === 0) throw new HallmarkError('CA_NOT_FOUND', `no CRL for any active issuing CA: ${skipped.join('; ')}`);
    return { pem: crls.map((c) => encodePem('X509 CRL', c.der)).join(''), cas: names, crls, skipped };
  } finally {
    if (!shared) await publisher.stop();
  }
}

interface ConfigInputs { files: MosquittoConfig['files']; port: number; host: string; user: string; admin?: { plugin: string; socket?: string; port?: number } }

function configText(o: ConfigInputs): string {
  const f = o.files;
  const admin = o.admin
    ? `# The admin listener: only Hallmark's control client (user ${ADMIN_USERNAME}, password in ${f.admin}) logs in
# here, to disconnect revoked and suspended devices at once through the dynamic security plugin. The
# plugin serves this listener only (per_listener_settings true): devices never reach $CONTROL.
listener ${o.admin.socket ? `0 ${o.admin.socket}` : `${o.admin.port} 127.0.0.1`}
protocol mqtt
allow_anonymous false
plugin ${o.admin.plugin}
plugin_opt_config_file ${f.dynsec}

`
    : `# No admin listener: the dynamic security plugin was not found (or --no-dynsec). Revoked and suspended
# devices are refused at their next connection; open sessions are not cut.

`;
  return `# Mosquitto 2.0 configuration written by "hallmark broker mosquitto" (see README.txt beside it).
# Devices connect with their Hallmark certificate; the MQTT username is the certificate's CN (the UDID).

per_listener_settings true
user ${o.user}
pid_file ${f.pid}
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true

${admin}# The device listener: TLS with a client certificate from a Hallmark CA, checked against crl.pem.
listener ${o.port} ${o.host}
protocol mqtt
allow_anonymous false
acl_file ${f.acl}
cafile ${f.ca}
certfile ${f.cert}
keyfile ${f.key}
crlfile ${f.crl}
require_certificate true
use_identity_as_username true
tls_version tlsv1.2
`;
}

function readmeText(o: ConfigInputs & { home?: string; cas: readonly string[] }): string {
  const f = o.files;
  const dir = resolve(f.config, '..');
  return `Mosquitto configuration written by Hallmark (hallmark broker mosquitto).

Run:
  mosquitto -c ${f.config}

Devices connect over TLS on ${o.host}:${o.port} with their Hallmark certificate and key, trusting
${f.ca}; the MQTT username is the certificate's CN (the device UDID). For example:
  mosquitto_pub --cafile ca.pem --cert device.pem --key device.key -h ${o.host} -p ${o.port} -t devices/UDID/telemetry -m hi

Files:
  mosquitto.conf     the device listener (require_certificate, use_identity_as_username, acl_file, crlfile),
                     ${o.admin ? `the admin listener (${o.admin.socket ?? `127.0.0.1:${o.admin.port}`}, dynamic security plugin)` : 'no admin listener (no dynamic security plugin)'}, pid file
  ca.pem             Hallmark's CA certificates (active issuing CAs and root)
  server.pem         the broker's certificate, issued by Hallmark, followed by its issuing CA
  server.key         the broker's PRIVATE KEY (mode 0600). It is the broker's own key, not a CA key;
                     keep it readable only by the user Mosquitto runs as (the "user" line).
  crl.pem            full CRLs of the issuing CAs (${o.cas.join(', ')}), concatenated
  acl                each device's topics, from its product's policy (rewritten from the registry)
${o.admin ? `  dynsec.json        the dynamic security plugin's state: the admin client only (a password hash)
  broker-admin.json  the admin client's PASSWORD (mode 0600), read by hallmark serve --broker-dir
` : ''}
Keeping it current: Mosquitto refuses revoked devices only as far as crl.pem says (and the CRLs expire:
nextUpdate, 7 days), and gives a device only what acl says. Keep both current with either
  hallmark serve --broker-dir ${dir}
      (on every revocation, suspension, resumption, registration and policy change, and hourly;
       disconnects revoked, suspended and decommissioned devices at once${o.admin ? '' : ' — not with this configuration'})
  hallmark broker mosquitto-crl --dir ${dir}${o.home ? ` --home ${o.home}` : ''}   (e.g. from cron, at least daily)
Both rewrite the files atomically and send SIGHUP to the pid in mosquitto.pid; Mosquitto then reloads
its TLS files and its ACL (also for open connections).
`;
}

/** Writes the whole configuration (see the header comment). Returns the paths and the broker's certificate. */
export async function writeMosquittoConfig(authority: Authority, options: MosquittoOptions): Promise<MosquittoConfig> {
  const dir = resolve(options.dir);
  const port = options.port ?? 8883;
  const host = options.host ?? '127.0.0.1';
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new HallmarkError('BAD_REQUEST', `bad port ${port}`);
  if (options.adminPort !== undefined && (!Number.isInteger(options.adminPort) || options.adminPort < 1 || options.adminPort > 65535 || options.adminPort === port)) {
    throw new HallmarkError('BAD_REQUEST', `bad admin port ${options.adminPort}`);
  }
  if (/\s/.test(dir)) throw new HallmarkError('BAD_REQUEST', 'the broker directory may not contain white space (mosquitto.conf names files by path)');
  let user = options.user;
  if (!user) {
    try { user = userInfo().username; } catch { user = 'mosquitto'; }
  }
  const plugin = options.dynsecPlugin === false ? undefined : options.dynsecPlugin ?? findDynsecPlugin();
  if (plugin !== undefined && (/\s/.test(plugin) || !existsSync(plugin))) throw new HallmarkError('BAD_REQUEST', `the dynamic security plugin ${plugin} does not exist (or its path has white space)`);
  await mkdir(dir, { recursive: true });
  const files = pathsIn(dir);

  const { publicKey, privateKey } = await ecKey();
  const server = await authority.issueForOwnKey({
    signer: memorySigner(privateKey, publicKey),
    profile: 'tls-server',
    subject: `CN=localhost,OU=MQTT broker,O=${authority.config.org}`,
    altNames: { dns: ['localhost', ...(options.dnsNames ?? [])], ip: ['127.0.0.1', ...(options.ipAddresses ?? [])] },
    ca: options.ca,
    actor: options.actor,
  });
  const [issuer] = server.chain;
  const caCerts = await caCertificates(authority, undefined);
  const crls = await brokerCrls(authority);
  const aclChoice: AclChoice = options.acl ?? 'auto';
  if (aclChoice !== 'auto' && aclChoice !== 'per-device') throw new HallmarkError('BAD_REQUEST', `the ACL layout is auto or per-device, not ${JSON.stringify(aclChoice)}`);
  const acl = await buildAcl(authority.store, { layout: aclChoice });

  let admin: ConfigInputs['admin'];
  if (plugin) {
    // A Unix socket path is at most 107 bytes: a deep directory gets a loopback port instead.
    const socket = options.adminPort === undefined && Buffer.byteLength(files.socket) <= 100 ? files.socket : undefined;
    admin = socket ? { plugin, socket } : { plugin, port: options.adminPort ?? (await freePort()) };
    const password = newAdminPassword();
    const credentials: AdminCredentials = { username: ADMIN_USERNAME, password, ...(admin.socket ? { socket: admin.socket } : { host: '127.0.0.1', port: admin.port }) };
    await writeAtomic(files.dynsec, dynsecConfig(password), 0o600);
    await writeAtomic(files.admin, JSON.stringify(credentials, null, 2) + '\n', 0o600);
  } else {
    await rm(files.admin, { force: true });
  }

  await writeAtomic(files.key, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, 0o600);
  await writeAtomic(files.cert, encodePem('CERTIFICATE', server.der) + (issuer ? encodePem('CERTIFICATE', issuer) : ''));
  await writeAtomic(files.ca, caCerts.map((c) => encodePem('CERTIFICATE', c)).join(''));
  await writeAtomic(files.crl, crls.pem);
  await writeAtomic(files.acl, acl.text);
  await writeAtomic(files.settings, JSON.stringify({ acl: aclChoice } satisfies BrokerSettings, null, 2) + '\n');
  const inputs: ConfigInputs = { files, port, host, user, ...(admin ? { admin } : {}) };
  await writeAtomic(files.config, configText(inputs));
  await writeAtomic(files.readme, readmeText({ ...inputs, home: authority.home, cas: crls.cas }));
  return {
    dir, files, server, crlCas: crls.cas, crlSkipped: crls.skipped,
    ...(admin ? { admin: { plugin: admin.plugin, ...(admin.socket ? { socket: admin.socket } : { port: admin.port }) } } : {}),
    acl: { layout: acl.layout, devices: acl.devices, warnings: acl.warnings },
  };
}

interface BrokerSettings { readonly acl: AclChoice }

async function readSettings(dir: string): Promise<BrokerSettings> {
  try {
    const s = JSON.parse(await readFile(join(dir, MOSQUITTO_FILES.settings), 'utf8')) as Partial<BrokerSettings>;
    return { acl: s.acl === 'per-device' ? 'per-device' : 'auto' };
  } catch {
    return { acl: 'auto' };
  }
}

/** The pid in DIR/mosquitto.pid when that process is alive (and, on Linux, is a mosquitto), else undefined. */
export async function mosquittoPid(dir: string): Promise<number | undefined> {
  let text: string;
  try { text = await readFile(join(resolve(dir), MOSQUITTO_FILES.pid), 'utf8'); } catch { return undefined; }
  const pid = Number(text.trim());
  if (!Number.isInteger(pid) || pid <= 1) return undefined;
  try { process.kill(pid, 0); } catch { return undefined; }
  // A stale pid file may name an unrelated process by now: where /proc tells, signal only a mosquitto.
  try {
    if (!(await readFile(`/proc/${pid}/comm`, 'utf8')).includes('mosquitto')) return undefined;
  } catch { /* no /proc (not Linux): trust the pid file */ }
  return pid;
}

export interface SyncOptions {
  /** Rewrite crl.pem. */
  readonly crl?: boolean;
  /** Rewrite acl from the registry. */
  readonly acl?: boolean;
  /** Disconnect the sessions of these usernames (UDIDs) after the reload. */
  readonly kick?: Iterable<string>;
  /**
   * The admin connection to use (keepMosquittoInStep keeps one open); undefined from it: the configuration
   * has no admin listener. Default: one opened for this call from DIR/broker-admin.json.
   */
  readonly admin?: () => Promise<MosquittoAdmin | undefined>;
  /** Renew the broker's own certificate when fewer than BROKER_CERT_RENEW_WITHIN_DAYS are left (`now`: for tests). */
  readonly certificate?: boolean | { readonly now: Date };
}

export interface SyncResult {
  /** When crl.pem was rewritten: its CAs and their CRL numbers, and the CAs left out (with why). */
  readonly cas?: string[];
  readonly numbers?: number[];
  readonly crlSkipped?: string[];
  /** When acl was rebuilt: its layout, the devices it names, whether the file changed. */
  readonly acl?: { readonly layout: AclLayout; readonly devices: number; readonly blocked: number; readonly changed: boolean; readonly warnings: readonly string[] };
  /** The broker's pid, when SIGHUP was sent. */
  readonly signalled?: number;
  /** Sessions disconnected (when asked to, the broker runs and has an admin listener). */
  readonly kick?: KickResult;
  /** Why nothing could be disconnected, when asked to. */
  readonly kickError?: string;
  /** After a SIGHUP: milliseconds until the broker was seen past its reload (through the admin listener). */
  readonly reloadMs?: number;
  /** Why the end of the reload could not be seen (no admin listener, or it did not answer). */
  readonly reloadUnconfirmed?: string;
  /** When the broker's certificate was renewed: the new one. */
  readonly certificateRenewed?: { readonly serial: string; readonly notAfter: string };
}

/** The broker's own certificate (tls-server, 397 days) is renewed when fewer days than this are left. */
export const BROKER_CERT_RENEW_WITHIN_DAYS = 30;

/**
 * Renews DIR/server.pem and DIR/server.key (a new key; same subject and names; the default issuing CA)
 * when the certificate there has fewer than BROKER_CERT_RENEW_WITHIN_DAYS left. Mosquitto 2.0 reloads its
 * certificate and key on SIGHUP (new connections get the new one; open sessions stay up).
 */
async function renewBrokerCertificateIfDue(authority: Authority, dir: string, now: Date): Promise<IssuedCertificate | undefined> {
  const files = pathsIn(dir);
  const first = decodePemBlocks(await readFile(files.cert, 'utf8'), 64 * 1024).find((b) => b.label === 'CERTIFICATE');
  if (!first) throw new HallmarkError('BAD_PEM', `${files.cert} holds no certificate`);
  const current = new X509Certificate(first.der);
  if (new Date(current.validTo).getTime() - now.getTime() >= BROKER_CERT_RENEW_WITHIN_DAYS * 86_400_000) return undefined;
  const { publicKey, privateKey } = await ecKey();
  const renewed = await authority.issueForOwnKey({
    signer: memorySigner(privateKey, publicKey),
    profile: 'tls-server',
    subject: `CN=localhost,OU=MQTT broker,O=${authority.config.org}`,
    altNames: subjectAltNames(current),
    actor: 'broker-sync',
  });
  // Key first: until the SIGHUP Mosquitto holds both in memory, and after it reads the pair written here.
  await writeAtomic(files.key, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, 0o600);
  // The issuing CA, and during a root rollover the link certificates (devices pinning the old root).
  const chain = [renewed.der, ...renewed.chain.slice(0, -1), ...(await rolloverLinks(authority))];
  await writeAtomic(files.cert, chain.map((d) => encodePem('CERTIFICATE', d)).join(''));
  return renewed;
}

/**
 * Brings DIR in step with the authority: rewrites crl.pem and / or acl (atomically), sends SIGHUP to the
 * live broker of DIR/mosquitto.pid when a file changed, then disconnects the named devices' sessions
 * through the admin listener, then waits (through the admin listener) until the broker is past its reload.
 * The kick comes after the SIGHUP: Mosquitto reloads at the end of the loop iteration that saw the
 * signal, before it reads the kicked device's next handshake, so a device that reconnects at once meets
 * the new CRL and ACL. The wait keeps the next sync's SIGHUP from landing in this reload (it would be lost).
 */
export async function syncMosquitto(authority: Authority, dir: string, options: SyncOptions): Promise<SyncResult> {
  const abs = resolve(dir);
  const result: { -readonly [K in keyof SyncResult]: SyncResult[K] } = {};
  let changed = false;
  if (options.certificate) {
    const renewed = await renewBrokerCertificateIfDue(authority, abs, options.certificate === true ? new Date() : options.certificate.now);
    if (renewed) {
      result.certificateRenewed = { serial: renewed.serial, notAfter: renewed.notAfter.toISOString() };
      changed = true;
    }
  }
  if (options.crl) {
    const crls = await brokerCrls(authority);
    await writeAtomic(join(abs, MOSQUITTO_FILES.crl), crls.pem);
    result.cas = crls.cas;
    result.numbers = crls.crls.map((c) => c.number);
    if (crls.skipped.length > 0) result.crlSkipped = crls.skipped;
    changed = true;
  }
  if (options.acl) {
    const acl = await buildAcl(authority.store, { layout: (await readSettings(abs)).acl });
    const path = join(abs, MOSQUITTO_FILES.acl);
    const current = await readFile(path, 'utf8').catch(() => undefined);
    const aclChanged = current !== acl.text;
    if (aclChanged) await writeAtomic(path, acl.text);
    result.acl = { layout: acl.layout, devices: acl.devices, blocked: acl.blocked, changed: aclChanged, warnings: acl.warnings };
    changed ||= aclChanged;
  }
  const pid = await mosquittoPid(abs);
  if (pid !== undefined && changed) {
    process.kill(pid, 'SIGHUP');
    result.signalled = pid;
  }
  const kick = options.kick ? [...new Set(options.kick)] : [];
  if (pid === undefined) {
    if (kick.length > 0) result.kickError = 'no running broker (no live pid in mosquitto.pid)';
    return result;
  }
  if (kick.length === 0 && result.signalled === undefined) return result;
  const signalledAt = performance.now();
  let own: MosquittoAdmin | undefined;
  try {
    let admin: MosquittoAdmin | undefined;
    try {
      if (options.admin) admin = await options.admin();
      else {
        const credentials = await readAdminCredentials(abs);
        if (credentials) admin = own = await MosquittoAdmin.open(credentials);
      }
    } catch (err) {
      const why = (err as Error).message ?? String(err);
      if (kick.length > 0) result.kickError = why;
      if (result.signalled !== undefined) result.reloadUnconfirmed = why;
      return result;
    }
    if (!admin) {
      if (kick.length > 0) result.kickError = 'the configuration has no admin listener (no dynamic security plugin): open sessions stay open';
      if (result.signalled !== undefined) result.reloadUnconfirmed = 'no admin listener';
      return result;
    }
    if (kick.length > 0) {
      try { result.kick = await admin.kick(kick); } catch (err) { result.kickError = (err as Error).message ?? String(err); }
    }
    if (result.signalled !== undefined) {
      // Mosquitto reloads at the end of the loop iteration that saw the signal and clears its reload flag
      // afterwards: a SIGHUP that arrives during a reload is lost. So a sync is over only once the reload is:
      // the second of two answered requests is read in a later iteration than the signal, hence after it.
      try {
        await admin.ping();
        await admin.ping();
        result.reloadMs = performance.now() - signalledAt;
      } catch (err) {
        result.reloadUnconfirmed = (err as Error).message ?? String(err);
      }
    }
  } finally {
    own?.close();
  }
  return result;
}

/**
 * Rewrites DIR/crl.pem and DIR/acl from the current state and, when a live Mosquitto wrote
 * DIR/mosquitto.pid, sends it SIGHUP so it reloads them. Returns what it did.
 */
export async function refreshMosquittoCrl(authority: Authority, dir: string): Promise<SyncResult & { cas: string[]; numbers: number[] }> {
  const r = await syncMosquitto(authority, dir, { crl: true, acl: true, certificate: true });
  return { ...r, cas: r.cas ?? [], numbers: r.numbers ?? [] };
}

/** Audit actions that change what the broker must know. */
// A suspension puts the device's certificates on hold in the CRL (certificateHold), a resumption takes them off.
const CRL_ACTIONS = new Set(['certificate.revoke', 'revocation.bulk', 'device.revoke', 'device.decommission', 'device.suspend', 'device.resume']);
const ACL_ACTIONS = new Set(['device.register', 'device.reregister', 'device.suspend', 'device.resume', 'device.revoke', 'device.decommission']);
const KICK_ACTIONS = new Set(['device.suspend', 'device.revoke', 'device.decommission']);
const WATCHED = [...new Set([...CRL_ACTIONS, ...ACL_ACTIONS])];

async function headSeq(store: Store): Promise<number> {
  const r = await store.db.selectFrom('audit_log').select((eb) => eb.fn.max('seq').as('seq')).executeTakeFirst();
  return r?.seq === null || r?.seq === undefined ? 0 : Number(r.seq);
}

export interface KeepInStepOptions {
  /** Full refresh (CRL and ACL) interval. Default hourly (the full CRLs are valid 7 days and made again daily). */
  readonly everyMs?: number;
  /** How often the audit log is read for changes made by other processes. Default 200 ms. */
  readonly pollMs?: number;
  readonly onError?: (err: unknown) => void;
  /** Called after every sync that did something. */
  readonly onSync?: (result: SyncResult) => void;
}

/**
 * Keeps DIR in step with the authority until the returned function is called: at once (CRL and ACL), on
 * every change the audit log shows (revocations, device suspension / resumption / registration /
 * decommissioning, product policy changes, CA changes; read every `pollMs`, and at once on the authority's
 * 'revoked' events), and every `everyMs`. Devices revoked, suspended or decommissioned are disconnected
 * at once when the configuration has an admin listener. Failures go to `onError` (default: stderr) and
 * the work is retried a few seconds later.
 */
export function keepMosquittoInStep(authority: Authority, dir: string, options: KeepInStepOptions = {}): () => void {
  const onError = options.onError ?? ((err: unknown) => process.stderr.write(`hallmark: broker refresh failed: ${(err as Error).message ?? String(err)}\n`));
  const store = authority.store;
  let lastSeq: number | undefined;
  let pending = { crl: true, acl: true, certificate: true, kick: new Set<string>() };
  let running: Promise<unknown> | undefined;
  let again = false;
  let stopped = false;
  let retryAt = 0;
  let admin: MosquittoAdmin | undefined;

  const adminConnection = async (): Promise<MosquittoAdmin | undefined> => {
    if (stopped) throw new Error('stopped');
    if (admin?.connected) return admin;
    admin?.close();
    admin = undefined;
    const credentials = await readAdminCredentials(dir);
    if (!credentials) return undefined;
    admin = await MosquittoAdmin.open(credentials);
    return admin;
  };

  const readAudit = async (): Promise<void> => {
    if (lastSeq === undefined) { lastSeq = await headSeq(store); return; }
    const head = await headSeq(store);
    if (head <= lastSeq) return;
    const rows = await store.db.selectFrom('audit_log').select(['seq', 'action', 'target', 'details'])
      .where('seq', '>', lastSeq).where('seq', '<=', head)
      .where((eb) => eb.or([eb('action', 'in', WATCHED), eb('action', 'like', 'product.%'), eb('action', 'like', 'ca.%')]))
      .orderBy('seq').execute();
    for (const r of rows) {
      if (CRL_ACTIONS.has(r.action) || r.action.startsWith('ca.')) pending.crl = true;
      if (ACL_ACTIONS.has(r.action) || r.action.startsWith('product.')) pending.acl = true;
      if (KICK_ACTIONS.has(r.action)) pending.kick.add(r.target);
      if (r.action === 'certificate.revoke') {
        try {
          const device = (JSON.parse(r.details) as { device?: unknown }).device;
          if (typeof device === 'string' && device) pending.kick.add(device);
        } catch { /* not JSON: no device to disconnect */ }
      }
    }
    lastSeq = head;
  };

  const cycle = async (): Promise<void> => {
    await readAudit();
    if (Date.now() < retryAt) return;
    const job = pending;
    if (!job.crl && !job.acl && !job.certificate && job.kick.size === 0) return;
    pending = { crl: false, acl: false, certificate: false, kick: new Set() };
    try {
      const r = await syncMosquitto(authority, dir, { crl: job.crl, acl: job.acl, certificate: job.certificate, kick: job.kick, admin: adminConnection });
      if (r.kickError) onError(new Error(`could not disconnect ${[...job.kick].join(', ')}: ${r.kickError}`));
      if (r.kick?.failed.length) onError(new Error(`could not disconnect ${r.kick.failed.map((f) => `${f.udid} (${f.error})`).join(', ')}`));
      if (r.acl?.warnings.length) for (const w of r.acl.warnings) onError(new Error(`broker ACL: ${w}`));
      for (const w of r.crlSkipped ?? []) onError(new Error(`broker CRL: no CRL for ${w}`));
      if (r.reloadUnconfirmed && r.reloadUnconfirmed !== 'no admin listener') onError(new Error(`could not see the broker finish its reload: ${r.reloadUnconfirmed}`));
      options.onSync?.(r);
    } catch (err) {
      // Put the work back and try again in a few seconds (kicks are not repeated: the CRL and ACL still hold).
      pending.crl ||= job.crl;
      pending.acl ||= job.acl;
      pending.certificate ||= job.certificate;
      retryAt = Date.now() + 5000;
      throw err;
    }
  };

  const run = (): void => {
    if (stopped) return;
    if (running) { again = true; return; }
    running = cycle().catch(onError).finally(() => {
      running = undefined;
      if (stopped) { admin?.close(); admin = undefined; return; }
      if (again) { again = false; run(); }
    });
  };
  const onRevoked = (): void => run();
  authority.events.on('revoked', onRevoked);
  const poll = setInterval(run, options.pollMs ?? 200);
  poll.unref();
  const full = setInterval(() => { pending.crl = true; pending.acl = true; pending.certificate = true; run(); }, options.everyMs ?? 3_600_000);
  full.unref();
  // At once: the files may have gone stale while nothing kept them. The audit tail starts from here.
  void headSeq(store).then((s) => { lastSeq ??= s; }, () => {}).finally(run);
  return () => {
    stopped = true;
    authority.events.off('revoked', onRevoked);
    clearInterval(poll);
    clearInterval(full);
    admin?.close();
    admin = undefined;
  };
}
