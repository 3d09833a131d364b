// The overview refreshes itself: the server sends its figures as an HTML fragment (server-sent
// events); without script the page still shows them as of its load.
(function () {
  "use strict";
  var box = document.getElementById("overview");
  if (!box || !window.EventSource) { return; }
  var live = document.getElementById("live");
  var source = new EventSource(box.getAttribute("data-stream"));
  source.addEventListener("overview", function (event) {
    box.innerHTML = event.data;  // rendered and escaped by the server's templates
    if (live) { live.className = "live on"; }
  });
  source.onerror = function () {
    if (live) { live.className = "live off"; }  // EventSource reconnects by itself
  };
})();
