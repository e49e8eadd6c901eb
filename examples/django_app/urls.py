from django.urls import path

from . import views

urlpatterns = [
    path("", views.home),
    path("inc", views.inc),
    path("api/count", views.api_count),
    path("api/peek", views.api_peek),
    path("login", views.login),
    path("logout", views.logout),
]
