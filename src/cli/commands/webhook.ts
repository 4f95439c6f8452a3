import { WEBHOOK_EVENTS, createWebhook, disableWebhook, listDeliveries, listWebhooks, retryDelivery, type DeliveryStatus } from '../../events/webhooks.js';
import { HallmarkError } from '../../errors.js';
import { withStoreOnly } from '../context.js';
import { actor, flag, info, intOption, out, required, str, table, type Command } from '../io.js';

export const webhookAddCommand: Command = {
  name: 'webhook add',
  summary: 'subscribe a URL to events (issued, revoked, expiring, quota-exceeded, clone-detected); prints its secret once',
  usage: `Usage: hallmark webhook add URL --events EVENT[,EVENT…] [--json] [--home DIR]

Events: ${WEBHOOK_EVENTS.join(', ')}.
Prints the webhook id and its signing secret (shown once; keep it in the receiver). Every delivery is a
POST of JSON {id, event, at, data} signed with Hallmark-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
"<t>.<body>">, retried with backoff for about a day. A running \`hallmark serve\` sends them; see
docs/webhooks.md. Deliveries go to whatever the URL names, loopback and private addresses included:
restrict the server's egress where that matters.`,
  allowPositionals: true,
  options: { events: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const url = args.positionals[0];
    if (!url || args.positionals.length > 1) throw new HallmarkError('BAD_REQUEST', `give one URL\n${this.usage}`);
    const events = required(args, 'events', this.usage);
    return withStoreOnly(args, async (ctx) => {
      const created = await createWebhook(ctx.store, { url, events, actor: actor() });
      if (flag(args, 'json')) out(JSON.stringify(created, null, 2));
      else out(`id: ${created.id}\nsecret: ${created.secret}`);
      info(`Webhook ${created.id} for ${created.events.join(', ')} -> ${created.url}. The secret is not shown again.`);
      return 0;
    });
  },
};

export const webhookListCommand: Command = {
  name: 'webhook list',
  summary: 'list webhooks with their delivery counts by status (never their secrets)',
  usage: 'Usage: hallmark webhook list [--json] [--home DIR]',
  options: { json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const hooks = await listWebhooks(ctx.store);
      if (flag(args, 'json')) out(JSON.stringify(hooks, null, 2));
      else {
        out(table(['ID', 'STATUS', 'URL', 'EVENTS', 'PENDING', 'DELIVERED', 'FAILED', 'CREATED'],
          hooks.map((h) => [h.id, h.status, h.url, h.events.join(','), String(h.deliveries.pending), String(h.deliveries.delivered), String(h.deliveries.failed), h.createdAt])));
      }
      return 0;
    });
  },
};

export const webhookDeliveriesCommand: Command = {
  name: 'webhook deliveries',
  summary: 'list webhook deliveries, newest first, with their status, attempts and last error',
  usage: 'Usage: hallmark webhook deliveries [--webhook ID] [--status pending|delivered|failed] [--limit N] [--json] [--home DIR]',
  options: { webhook: { type: 'string' }, status: { type: 'string' }, limit: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const status = str(args, 'status') as DeliveryStatus | undefined;
    return withStoreOnly(args, async (ctx) => {
      const rows = await listDeliveries(ctx.store, { webhook: str(args, 'webhook'), status, limit: intOption(args, 'limit') ?? 50 });
      if (flag(args, 'json')) out(JSON.stringify(rows, null, 2));
      else {
        out(table(['ID', 'WEBHOOK', 'EVENT', 'STATUS', 'ATTEMPTS', 'LAST STATUS', 'NEXT ATTEMPT', 'CREATED', 'LAST ERROR'],
          rows.map((d) => [String(d.id), d.webhook, d.event, d.status, String(d.attempts), d.lastStatus === null ? '-' : String(d.lastStatus), d.nextAttemptAt ?? '-', d.createdAt, d.lastError ?? '-'])));
      }
      return 0;
    });
  },
};

export const webhookDisableCommand: Command = {
  name: 'webhook disable',
  summary: 'disable a webhook (nothing more is sent to it; its pending deliveries are marked failed)',
  usage: 'Usage: hallmark webhook disable ID [--home DIR]',
  allowPositionals: true,
  options: {},
  async run(args) {
    const id = args.positionals[0];
    if (!id || args.positionals.length > 1) throw new HallmarkError('BAD_REQUEST', `give one webhook id\n${this.usage}`);
    return withStoreOnly(args, async (ctx) => {
      await disableWebhook(ctx.store, id, actor());
      out(`Disabled webhook ${id}`);
      return 0;
    });
  },
};

export const webhookRetryCommand: Command = {
  name: 'webhook retry',
  summary: 'send a webhook delivery again now (a failed one, or one the receiver lost)',
  usage: 'Usage: hallmark webhook retry DELIVERY_ID [--home DIR]\n\nThe running server sends it within a second or so, with a fresh series of attempts.',
  allowPositionals: true,
  options: {},
  async run(args) {
    const id = args.positionals[0];
    if (!id || args.positionals.length > 1 || !/^\d{1,15}$/.test(id)) throw new HallmarkError('BAD_REQUEST', `give one delivery id (a number)\n${this.usage}`);
    return withStoreOnly(args, async (ctx) => {
      const d = await retryDelivery(ctx.store, Number(id));
      out(`Delivery ${d.id} (${d.event} to ${d.webhook}) is pending again`);
      return 0;
    });
  },
};
