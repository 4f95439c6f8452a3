// A Mosquitto (2.0.x) configuration for devices that connect with their Hallmark identity:
//
//   mosquitto.conf  one TLS listener: require_certificate, use_identity_as_username (the username is
//                   the certificate's CN, which Hallmark sets to the device UDID), cafile, certfile,
//                   keyfile, crlfile; acl_file; pid_file (so a refresh can send SIGHUP)
//   ca.pem          the CA certificates EST /cacerts serves: the active issuing CAs and the root(s)
//   server.pem      the broker's TLS server certificate (issued by Hallmark) followed by its issuing CA
//   server.key      the broker's own private key (PKCS#8 PEM, mode 0600) — not a CA key
//   crl.pem         the full CRL of every active issuing CA, concatenated (Mosquitto takes one crlfile)
//   acl             pattern write devices/%u/#, pattern read devices/%u/commands/#
//   README.txt      how to run it and how the CRL is kept current
//
// refreshMosquittoCrl rewrites crl.pem atomically and sends SIGHUP to the broker named by the pid file;
// Mosquitto 2.0.x reloads its listeners' TLS files (certfile, keyfile, cafile, crlfile) on SIGHUP — the
// interop test checks that a revoked device is refused at its next connection.

import { generateKeyPair, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { chmod, mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { userInfo } from 'node:os';
import { join, resolve } from 'node:path';
import type { Authority, IssuedCertificate } from '../authority/authority.js';
import { CrlPublisher, type CrlRecord } from '../authority/crl-publisher.js';
import type { RevokedEvent } from '../authority/revocation.js';
import { HallmarkError } from '../errors.js';
import type { Signer } from '../keys/key-backend.js';
import { encodePem } from '../pki/pem.js';
import { caCertificates } from '../protocols/est/routes.js';
import { crlPublisherOf } from '../protocols/crl/routes.js';

export const MOSQUITTO_FILES = {
  config: 'mosquitto.conf',
  ca: 'ca.pem',
  cert: 'server.pem',
  key: 'server.key',
  crl: 'crl.pem',
  acl: 'acl',
  pid: 'mosquitto.pid',
  readme: 'README.txt',
} as const;

/** The default per-device topic policy (a product's `policy` JSON may refine it later). */
export const DEFAULT_DEVICE_ACL = [
  'pattern write devices/%u/#',
  'pattern read devices/%u/commands/#',
] as const;

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
  readonly actor: string;
}

export interface MosquittoConfig {
  readonly dir: string;
  readonly files: { readonly [K in keyof typeof MOSQUITTO_FILES]: string };
  readonly server: IssuedCertificate;
  /** Names of the issuing CAs whose CRLs are in crl.pem. */
  readonly crlCas: readonly string[];
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
 * publisher's delta has entries a new full CRL is made at once.
 */
export async function brokerCrls(authority: Authority): Promise<{ pem: string; cas: string[]; crls: CrlRecord[] }> {
  const shared = crlPublisherOf(authority);
  const publisher = shared ?? new CrlPublisher(authority, { checkEveryMs: 0, actor: 'broker' });
  try {
    const cas = (await authority.listCas()).filter((c) => c.role === 'intermediate' && c.status === 'active');
    if (cas.length === 0) throw new HallmarkError('CA_NOT_FOUND', 'no active issuing CA: nothing to build a CRL file from');
    const crls: CrlRecord[] = [];
    for (const ca of cas) {
      const delta = await publisher.current(ca.name, 'delta');
      crls.push(delta.entries > 0 ? (await publisher.regenerate(ca.name)).full : await publisher.current(ca.name, 'full'));
    }
    return { pem: crls.map((c) => encodePem('X509 CRL', c.der)).join(''), cas: cas.map((c) => c.name), crls };
  } finally {
    if (!shared) await publisher.stop();
  }
}

function configText(o: { files: MosquittoConfig['files']; port: number; host: string; user: string }): string {
  const f = o.files;
  return `# Mosquitto 2.0 configuration written by "hallmark broker mosquitto" (see README.txt beside it).
# Devices connect with their Hallmark certificate; the MQTT username is the certificate's CN (the UDID).

per_listener_settings false
user ${o.user}
pid_file ${f.pid}
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true

allow_anonymous false
acl_file ${f.acl}

listener ${o.port} ${o.host}
protocol mqtt
cafile ${f.ca}
certfile ${f.cert}
keyfile ${f.key}
crlfile ${f.crl}
require_certificate true
use_identity_as_username true
tls_version tlsv1.2
`;
}

function aclText(): string {
  return `# Per-device topics. %u is the MQTT username: the client certificate's CN, i.e. the device UDID.
# Default product policy: a device publishes under devices/<UDID>/ and reads its commands.
${DEFAULT_DEVICE_ACL.join('\n')}
`;
}

function readmeText(o: { files: MosquittoConfig['files']; port: number; host: string; home?: string; cas: readonly string[] }): string {
  const f = o.files;
  return `Mosquitto configuration written by Hallmark (hallmark broker mosquitto).

Run:
  mosquitto -c ${f.config}

Devices connect over TLS on ${o.host}:${o.port} with their Hallmark certificate and key, trusting
${f.ca}; the MQTT username is the certificate's CN (the device UDID). For example:
  mosquitto_pub --cafile ca.pem --cert device.pem --key device.key -h ${o.host} -p ${o.port} -t devices/UDID/telemetry -m hi

Files:
  mosquitto.conf  the listener (require_certificate, use_identity_as_username), ACL, pid file
  ca.pem          Hallmark's CA certificates (active issuing CAs and root)
  server.pem      the broker's certificate, issued by Hallmark, followed by its issuing CA
  server.key      the broker's PRIVATE KEY (mode 0600). It is the broker's own key, not a CA key;
                  keep it readable only by the user Mosquitto runs as (the "user" line).
  crl.pem         full CRLs of the issuing CAs (${o.cas.join(', ')}), concatenated
  acl             per-device topics: write devices/<UDID>/#, read devices/<UDID>/commands/#

CRL: Mosquitto refuses revoked devices only as far as crl.pem says, and the CRLs expire
(nextUpdate, 7 days). Keep it current with either
  hallmark serve --broker-dir ${resolve(f.config, '..')}     (rewrites it on every revocation and hourly)
  hallmark broker mosquitto-crl --dir ${resolve(f.config, '..')}${o.home ? ` --home ${o.home}` : ''}   (e.g. from cron, at least daily)
Both rewrite crl.pem atomically and send SIGHUP to the pid in mosquitto.pid; Mosquitto then reloads
its TLS files. A revoked device is refused at its next connection; a connection already open stays
open until it closes.
`;
}

/** Writes the whole configuration (see the header comment). Returns the paths and the broker's certificate. */
export async function writeMosquittoConfig(authority: Authority, options: MosquittoOptions): Promise<MosquittoConfig> {
  const dir = resolve(options.dir);
  const port = options.port ?? 8883;
  const host = options.host ?? '127.0.0.1';
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new HallmarkError('BAD_REQUEST', `bad port ${port}`);
  if (/\s/.test(dir)) throw new HallmarkError('BAD_REQUEST', 'the broker directory may not contain white space (mosquitto.conf names files by path)');
  let user = options.user;
  if (!user) {
    try { user = userInfo().username; } catch { user = 'mosquitto'; }
  }
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

  await writeAtomic(files.key, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, 0o600);
  await writeAtomic(files.cert, encodePem('CERTIFICATE', server.der) + (issuer ? encodePem('CERTIFICATE', issuer) : ''));
  await writeAtomic(files.ca, caCerts.map((c) => encodePem('CERTIFICATE', c)).join(''));
  await writeAtomic(files.crl, crls.pem);
  await writeAtomic(files.acl, aclText());
  await writeAtomic(files.config, configText({ files, port, host, user }));
  await writeAtomic(files.readme, readmeText({ files, port, host, home: authority.home, cas: crls.cas }));
  return { dir, files, server, crlCas: crls.cas };
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

/**
 * Rewrites DIR/crl.pem (atomically) from the current full CRLs and, when a live Mosquitto wrote
 * DIR/mosquitto.pid, sends it SIGHUP so it reloads the file. Returns what it did.
 */
export async function refreshMosquittoCrl(authority: Authority, dir: string): Promise<{ cas: string[]; numbers: number[]; signalled?: number }> {
  const abs = resolve(dir);
  const crls = await brokerCrls(authority);
  await writeAtomic(join(abs, MOSQUITTO_FILES.crl), crls.pem);
  const pid = await mosquittoPid(abs);
  if (pid !== undefined) process.kill(pid, 'SIGHUP');
  return { cas: crls.cas, numbers: crls.crls.map((c) => c.number), ...(pid !== undefined ? { signalled: pid } : {}) };
}

/**
 * Keeps DIR/crl.pem in step with the authority: refreshes it at once, on every 'revoked' event
 * (coalesced) and every `everyMs` (default hourly; the full CRLs are valid 7 days and made again daily). Returns the
 * function that stops it. Failures go to `onError` (default: stderr).
 */
export function keepMosquittoInStep(authority: Authority, dir: string, options: { everyMs?: number; debounceMs?: number; onError?: (err: unknown) => void } = {}): () => void {
  const onError = options.onError ?? ((err: unknown) => process.stderr.write(`hallmark: broker CRL refresh failed: ${(err as Error).message ?? String(err)}\n`));
  let running: Promise<unknown> | undefined;
  let again = false;
  let stopped = false;
  let debounce: NodeJS.Timeout | undefined;
  const run = (): void => {
    if (stopped) return;
    if (running) { again = true; return; }
    running = refreshMosquittoCrl(authority, dir).catch(onError).finally(() => {
      running = undefined;
      if (again) { again = false; run(); }
    });
  };
  const onRevoked = (_event: RevokedEvent): void => {
    if (debounce) return;
    debounce = setTimeout(() => { debounce = undefined; run(); }, options.debounceMs ?? 50);
    debounce.unref();
  };
  authority.events.on('revoked', onRevoked);
  const timer = setInterval(run, options.everyMs ?? 3_600_000);
  timer.unref();
  run(); // at once: the file may have gone stale while nothing kept it
  return () => {
    stopped = true;
    authority.events.off('revoked', onRevoked);
    clearInterval(timer);
    if (debounce) clearTimeout(debounce);
  };
}
