/* ks-collector tag: keeps the Kuaishou click id (callback) and reports conversions. */
(function (window, document) {
  var previous = window.kstag;
  if (previous && previous.loaded) return;

  // Options

  // Without currentScript (old browsers), the first script that looks like this tag.
  var script = document.currentScript || document.querySelector('script[src$="/tag.js"]');
  var endpoint = (option('data-endpoint') || scriptOrigin()).replace(/\/+$/, '') + '/collect';
  var ttlDays = +option('data-ttl-days');
  var ttl = (ttlDays > 0 ? ttlDays : 7) * 864e5;
  var fieldName = option('data-field-name') || 'ks_callback';

  var CALLBACK_KEY = 'ks_cb';
  var QUEUE_KEY = 'ks_q';
  var QUEUE_SIZE = 20;
  var QUEUE_AGE = 864e5;
  var SEND_LIMIT = 5;
  var MACRO = /^__[A-Z0-9_]+__$/;

  // Helpers

  function option(name) {
    return script && script.getAttribute(name);
  }

  function scriptOrigin() {
    return script ? script.src.split('/').slice(0, 3).join('/') : '';
  }

  function now() {
    return Date.now();
  }

  function randomId() {
    var id = '', bytes = [];
    try {
      bytes = crypto.getRandomValues(new Uint8Array(32));
    } catch (e) {}
    // A hex digit from each random byte, or from Math.random alone where crypto is missing.
    for (var i = 0; i < 32; i++) id += ((bytes[i] ^ Math.random() * 16) & 15).toString(16);
    return id;
  }

  // Nothing the tag does may throw into the page: each way in (a kstag call, a page event, a
  // reply) runs through this, so a page that breaks a global loses at most that one report.
  function guard(fn) {
    return function (a, b) {
      try {
        fn(a, b);
      } catch (e) {}
    };
  }

  // A form's controls shadow its properties: <input name="appendChild"> is form.appendChild. So
  // forms are only handled through these, and never walked up from: a control named parentNode
  // would turn node.parentNode into a loop.
  var element = Element.prototype;

  // The innermost element with the attribute that holds node (or is node).
  function marked(node, name) {
    var all = document.querySelectorAll('[' + name + ']'), i = all.length;
    while (i--) {
      if (element.contains.call(all[i], node)) return all[i];
    }
  }

  // Storage: localStorage, else a first-party cookie, else this page view's memory.
  // Private modes, disabled cookies and sandboxed iframes make these accesses throw.

  var memory = {};

  function load(key) {
    try {
      var value = localStorage.getItem(key);
      if (value != null) return value;
    } catch (e) {}
    try {
      var match = document.cookie.match('(?:^|; )' + key + '=([^;]*)');
      if (match) return decodeURIComponent(match[1]);
    } catch (e) {}
    return memory[key];
  }

  // Only values given a maxAge (seconds) may go to a cookie: the queue is too big for one.
  function save(key, value, maxAge) {
    memory[key] = value;
    try {
      localStorage.setItem(key, value);
    } catch (e) {
      try {
        if (maxAge) {
          document.cookie = key + '=' + encodeURIComponent(value) + '; path=/; max-age=' + maxAge;
        }
      } catch (e2) {}
    }
  }

  // Click id

  function urlCallback() {
    var pattern = /[?&#]callback=([^&#]*)/g;
    var text = location.search + location.hash;
    var match, value;
    while ((match = pattern.exec(text))) {
      // Decoded once, and without turning '+' into a space: click ids carry a raw '+'.
      try {
        value = decodeURIComponent(match[1]);
      } catch (e) {
        value = match[1];
      }
      if (value && !MACRO.test(value)) return value;
    }
  }

  // Kept as 'expiry|click id', plain text: pages that change how JSON treats arrays (Prototype.js
  // makes an array serialize to a string) cannot garble it.
  function storedCallback() {
    var saved = /^(\d+)\|([^]+)/.exec(load(CALLBACK_KEY));
    if (saved && saved[1] > now()) return saved[2];
  }

  // Sending and the retry queue. A queued item is {e: event, t: time of the action,
  // n: sends so far, b: 1 once sent blind (by beacon or image, whose answer is unseen)}.

  // The queue is read without Array methods, which pages replace with broken versions; anything
  // stored there that is not a list of items counts as empty.
  function pending(exceptId) {
    var items = [];
    try {
      var saved = JSON.parse(load(QUEUE_KEY));
      for (var i = 0; i < saved.length; i++) {
        var item = saved[i];
        if (item.e.id !== exceptId && now() - item.t < QUEUE_AGE &&
            item.n < (item.b ? 2 : SEND_LIMIT)) items[items.length] = item;
      }
    } catch (e) {}
    return items;
  }

  function saveQueue(items) {
    items = items.slice(-QUEUE_SIZE);
    // Prototype.js gives arrays a toJSON that returns a string, which JSON.stringify would save.
    items.toJSON = 0;
    save(QUEUE_KEY, JSON.stringify(items));
  }

  // The caller saves the queue after this returns, so the new count and blind flag are kept.
  function send(item) {
    var event = item.e;
    // The first send is the action itself; a re-send says how long ago the action was.
    event.age_ms = item.n ? Math.max(0, now() - item.t) : 0;
    item.n++;
    var body = JSON.stringify(event);

    // A string body makes this a CORS simple request (text/plain): no preflight. Cross-origin,
    // the browser sends no cookies and only the page's origin as the referrer.
    try {
      fetch(endpoint, {method: 'POST', body: body, keepalive: true}).then(guard(function (answer) {
        // 2xx is committed; any other 4xx but 408 and 429 can never be accepted.
        if (/^(2|4(?!08|29))/.test(answer.status)) saveQueue(pending(event.id));
      }), function () {});
      return;
    } catch (e) {}

    // Neither of these shows the answer: the next page load sends the event once more.
    item.b = 1;
    try {
      if (navigator.sendBeacon(endpoint, body)) return;
    } catch (e) {}
    try {
      var image = new Image();
      // The origin, not the page's URL: the collector checks it against its allowlist.
      image.referrerPolicy = 'origin';
      image.src = endpoint + '?d=' + encodeURIComponent(body);
    } catch (e) {}
  }

  var flush = guard(function () {
    var items = pending();
    for (var i = 0; i < items.length; i++) send(items[i]);
    saveQueue(items);
  });

  var track = guard(function (type, props) {
    if (!callback || !type) return;

    var event = {v: 1, id: randomId(), type: '' + type, callback: callback};
    var leadId = props && props.lead_id;
    if (leadId != null && (leadId += '') && leadId.length <= 128) event.lead_id = leadId;

    var item = {e: event, t: now(), n: 0};
    var items = pending();
    items[items.length] = item; // not push: pages replace it with broken versions
    send(item);
    saveQueue(items);
  });

  // Page events

  function fillField(form) {
    var input = element.querySelector.call(form, 'input[name="' + fieldName + '"]');
    if (!input) {
      input = document.createElement('input');
      input.type = 'hidden';
      input.name = fieldName;
      element.appendChild.call(form, input);
    }
    input.value = callback;
  }

  var fillForms = guard(function () {
    for (var i = 0; i < document.forms.length; i++) fillField(document.forms[i]);
  });

  var wechatCopied = false;

  function wechatCopy(node) {
    if (!wechatCopied && marked(node, 'data-ks-wechat')) {
      wechatCopied = true;
      track('wechat_copy');
    }
  }

  function listen() {
    // Capture phase: forms and buttons whose own handlers stop propagation still count.
    document.addEventListener('submit', guard(function (e) {
      fillField(e.target);
      track('form');
    }), true);

    document.addEventListener('click', guard(function (e) {
      var tracked = marked(e.target, 'data-ks-track');
      if (tracked) track(tracked.getAttribute('data-ks-track'));
      wechatCopy(e.target);
    }), true);

    // Chromium and WebKit aim copy at the element where the selection starts (or the input).
    document.addEventListener('copy', guard(function (e) {
      wechatCopy(e.target);
    }), true);

    fillForms();
    try {
      new MutationObserver(fillForms).observe(document, {
        childList: true, subtree: true
      });
    } catch (e) {}
  }

  // Start

  var fromUrl = urlCallback();
  var stored = storedCallback();
  var callback = fromUrl || stored;
  if (fromUrl) save(CALLBACK_KEY, now() + ttl + '|' + fromUrl, ttl / 1e3 | 0);

  function kstag(command, type, props) {
    if (command === 'track') track(type, props);
  }
  kstag.loaded = true;
  window.kstag = kstag;

  if (callback) listen();
  flush();
  if (fromUrl && fromUrl !== stored) track('landing');
  // The page's queue may hold anything: one bad call must not stop the others.
  var calls = previous && previous.q || [];
  for (var i = 0; i < calls.length; i++) {
    try {
      kstag.apply(null, calls[i]);
    } catch (e) {}
  }
  window.addEventListener('online', flush);
})(window, document);
